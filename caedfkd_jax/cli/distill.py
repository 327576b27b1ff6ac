"""`caedfkd distill`: the launcher. Parses the config file and overrides, then trains.

    caedfkd distill --config cifar10_resnet56_resnet20 --workdir runs/r56_r20 \
        --config.teacher=teachers/resnet56 --config.time_budget_minutes=20

`--config` takes a path or the name of a config installed with the package
(configs/ ships as `caedfkd_jax.configs`), so it works from any directory.
Rerunning with the same workdir resumes from its last checkpoint. `--help`
lists every config field; it imports no JAX, so it answers at once.
"""

import ast
import importlib.util
import inspect
import io
import os
import re
import shlex
import sys
import textwrap
import tokenize
import traceback
from typing import Any, Callable

from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

from caedfkd_jax.config import defaults, fields
from caedfkd_jax.methods import registry

PROG = "caedfkd distill"
USAGE = (f"usage: {PROG} --config CONFIG[:ARG] --workdir DIR [--config.FIELD=VALUE ...]")
EXAMPLE = (f"  {PROG} --config cifar10_resnet56_resnet20 --workdir runs/demo "
           "--config.teacher=PATH_TO_TEACHER_BUNDLE")
_HELP_FLAGS = ("-h", "--help", "-help")
_CONFIG_FLAGS = ("--config", "-config")


TRAIN_PREFIX = "train_"   # configs/train_*.py are `caedfkd train`'s; the others `distill`'s.


def installed_configs(command: str = "distill") -> dict[str, str]:
  """Config name -> file, for `command`'s configs installed with the package
  (`caedfkd_jax.configs`): train_*.py for `train`, the others for `distill`."""
  spec = importlib.util.find_spec("caedfkd_jax.configs")
  if spec is None or not spec.submodule_search_locations:
    return {}
  found = {}
  for folder in spec.submodule_search_locations:
    for entry in sorted(os.listdir(folder)):
      if (entry.endswith(".py") and not entry.startswith("_")
          and entry.startswith(TRAIN_PREFIX) == (command == "train")):
        found.setdefault(entry[:-3], os.path.join(folder, entry))
  return found


def resolve_config_path(spec: str, command: str = "distill") -> str:
  """`--config PATH[:ARG]` or `NAME[.py][:ARG]` -> `FILE[:ARG]`: an existing path wins, then an
  installed config of that name (also for `configs/NAME.py`, the repository-root spelling)."""
  path, colon, arg = spec.partition(":")  # ml_collections splits at the first colon too.
  if os.path.isfile(path):
    return spec
  folder, name = os.path.split(path)
  name = name[:-3] if name.endswith(".py") else name
  installed = installed_configs(command)
  if folder in ("", "configs") and name in installed:
    return installed[name] + colon + arg
  other = "distill" if command == "train" else "train"
  if folder in ("", "configs") and name in installed_configs(other):
    raise ValueError(f"--config {spec}: {name!r} is a config of `caedfkd {other}`; `caedfkd "
                     f"{command}` takes one of: {', '.join(installed)}")
  listed = ', '.join(installed) or '(none installed)'
  if folder or path.endswith(".py"):
    raise ValueError(f"--config {spec}: there is no file {os.path.abspath(path)}; give an existing "
                     f"config file, or the name of an installed config (no path): {listed}")
  raise ValueError(f"--config {spec}: no installed config {name!r} (and no file of that name "
                   f"here); the installed configs are: {listed}")


def given_config(argv: list[str]) -> str | None:
  """The --config value as the user typed it."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in _CONFIG_FLAGS:
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def describe_config_file(spec: str, resolved: str) -> str:
  """One line saying which file `--config spec` runs: a local file or the installed one."""
  path = resolved.partition(":")[0]
  if os.path.abspath(spec.partition(":")[0]) == os.path.abspath(path):
    return f"config: {os.path.abspath(path)}"
  note = (f" (no {spec.partition(':')[0]} in {os.getcwd()})"
          if os.sep in spec or spec.partition(":")[0].endswith(".py") else "")
  return f"config: installed {path}{note}"


def _split_argv(argv: list[str], command: str = "distill"
                ) -> tuple[bool, list[str], str | None]:
  """Takes out the help flags and resolves every --config value; returns (help?, argv, config file)."""
  wants_help, out, config_file = False, [argv[0]], None
  rest = iter(argv[1:])
  for arg in rest:
    if arg == "--":  # Everything after it is positional: left alone.
      out += [arg, *rest]
      break
    if arg in _HELP_FLAGS:
      wants_help = True
      continue
    name, eq, value = arg.partition("=")
    if name in _CONFIG_FLAGS:
      if not eq:
        value = next(rest, None)
        if value is None:
          raise ValueError("--config needs a value: a config file's path or an installed config's "
                           "name, e.g. --config cifar10_resnet56_resnet20")
      value = resolve_config_path(value, command)
      config_file = value.partition(":")[0]
      arg = f"{name}={value}"
    out.append(arg)
  if config_file is None and any(a.startswith(("--config.", "-config.")) for a in out):
    raise ValueError("--config is missing: --config.FIELD=VALUE overrides a field of the config "
                     "file that --config names, e.g. " + (
                         "--config train_cifar:resnet20" if command == "train"
                         else "--config cifar10_resnet56_resnet20") +
                     f" (`caedfkd {command} --help` lists the installed configs)")
  return wants_help, out, config_file


def _parse(argv: list[str]):
  """Flags are defined per call: config_flags discovers --config.X overrides in `argv`."""
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", None, "Path of a config file (configs/*.py) or an installed config's name; "
      "override fields with --config.FIELD=VALUE.", flag_values=values, lock_config=True,
      sys_argv=argv)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and "
                                "the student bundle; an existing one is resumed.", flag_values=values)
  values(argv)
  return config, workdir


_CONVERSIONS = ((r"could not convert string to float: '(.*)'", "a number, e.g. 30 or 0.5"),
                (r"invalid literal for int\(\) with base 10: '(.*)'", "a whole number, e.g. 3"),
                (r"Non-boolean argument to boolean flag", "True or False"))


def _one_line(error: Exception, prog: str = PROG) -> str:
  """ml_collections wraps a get_config error in its whole traceback: keep the flag and the error."""
  message = str(error)
  flag = re.match(r"flag (--config\.[\w.]+)=(.*?): (.*)$", message.splitlines()[0] if message else "")
  if flag:
    for pattern, wanted in _CONVERSIONS:
      if re.search(pattern, flag.group(3), re.IGNORECASE):
        return (f"{flag.group(1)}={flag.group(2)}: the field takes {wanted} "
                f"(`{prog} --help` shows each field's value)")
  if message.startswith("Unknown command line flag"):
    return (f"{message.replace(' ?', '?')}; the flags are --config and --workdir, and config "
            f"fields are set with --config.FIELD=VALUE (`{prog} --help` lists them).")
  if "Traceback" not in message:
    return message
  lines = [line for line in message.splitlines() if line.strip()]
  return f"{lines[0].split(': Error whilst')[0]}: {lines[-1]}"


def _parse_error(error: Exception, argv: list[str], prog: str = PROG,
                 command: str = "distill") -> str:
  """Any other error of loading the config, in one line: an override of a field the config
  lacks (ml_collections raises a bare KeyError/AttributeError), or the config file's own error."""
  message = str(error).replace("\\n", " ")
  config_file = next((a.partition("=")[2].partition(":")[0] for a in argv
                      if a.startswith(("--config=", "-config="))), "")
  installed = {path: name for name, path in installed_configs(command).items()}
  key = re.search(r"\w+", message)
  if isinstance(error, (KeyError, AttributeError)) and key:
    for arg in argv:
      name = arg.partition("=")[0]
      path = name.split(".")[1:]
      if name.startswith(_CONFIG_FLAGS) and key.group() in path:
        parents = path[:path.index(key.group())]
        field = ".".join(parents + [key.group()])
        hint = re.search(r'Did you mean "(\w+)"', message)
        guess = f" (did you mean {'.'.join(parents + [hint.group(1)])!r}?)" if hint else ""
        owners = [] if parents or command != "distill" else _section_owners(key.group())
        if owners:
          return (f"{name}: the config has no section {field!r}, which only method "
                  f"{' or '.join(owners)} reads; use a config made for that method (its "
                  f"get_config calls defaults.get_config({owners[0]!r})).")
        return (f"{name}: the config has no field {field!r}{guess}; `{prog} --config "
                f"{installed.get(config_file, config_file) or 'CONFIG'} --help` lists its fields.")
  if isinstance(error, AttributeError) and "get_config" in message:
    return (f"--config {config_file}: the file defines no get_config(); a config file is Python "
            "with `def get_config():` returning a ConfigDict, like those in configs/.")
  line = next((f" (line {frame.lineno})" for frame in
               reversed(traceback.extract_tb(error.__traceback__))
               if os.path.abspath(frame.filename) == os.path.abspath(config_file)), "")
  return (f"--config {config_file}: loading it raised {type(error).__name__}{line}: "
          f"{message.splitlines()[0] if message else ''}")


def _section_owners(section: str) -> list[str]:
  """The methods whose own config holds `section` (imports them: only on this error's path)."""
  owners = []
  for name in registry.names():
    own = registry.get(name).own_config
    if own is not None and section in own():
      owners.append(name)
  # The method whose file declares the section first (cmi before cae_dfkd_cmi).
  return sorted(owners, key=lambda n: not registry.get(n).own_config.__module__.endswith("." + n))


# --help: the config fields, their values and the comments their files give them.

def _assigned_field(target: ast.expr) -> str | None:
  """`config.a.b` or `config["a"].b` -> "a.b"; None for any other assignment target."""
  parts = []
  while True:
    if isinstance(target, ast.Attribute):
      parts.append(target.attr)
      target = target.value
    elif (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
          and isinstance(target.slice.value, str)):
      parts.append(target.slice.value)
      target = target.value
    else:
      return ".".join(reversed(parts)) if isinstance(target, ast.Name) and parts else None


def field_docs(source: str) -> tuple[dict[str, str], dict[str, int], dict[int, str]]:
  """From a config file's source: field -> trailing comment (with its indented continuation
  lines), field -> line of its first assignment, and line -> section header comment."""
  comments = {}  # line -> (column, text, whether the comment has the line to itself)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      row, col = token.start
      comments[row] = (col, token.string.lstrip("#").strip(), not token.line[:col].strip())
  lines = source.splitlines()
  docs, first_line, sections = {}, {}, {}
  assigns = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)]
  for node in sorted(assigns, key=lambda node: node.lineno):
    name = _assigned_field(node.targets[0]) if len(node.targets) == 1 else None
    if name is None:
      continue
    first_line.setdefault(name, node.lineno)
    trailing = comments.get(node.end_lineno)
    if trailing and not trailing[2] and name not in docs:
      text, row = [trailing[1]], node.end_lineno + 1
      while row in comments and comments[row][2] and comments[row][0] > node.col_offset:
        text.append(comments[row][1])
        row += 1
      docs[name] = " ".join(text)
    header = comments.get(node.lineno - 1)
    if (header and header[2] and header[0] == node.col_offset
        and (node.lineno < 3 or not lines[node.lineno - 3].strip())):
      sections[node.lineno] = header[1]
  return docs, first_line, sections


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _method_docs(method: str) -> tuple[str, dict[str, str], dict[str, int]] | None:
  """(file, comments, lines) of the method's own sections, from the file that declares them;
  None for a method without (such as the default one, whose file would import JAX)."""
  if method == defaults.DEFAULT_METHOD or method not in registry.names():
    return None
  own = registry.get(method).own_config
  if own is None:
    return None
  path = inspect.getsourcefile(own)
  docs, order, _ = field_docs(_read(path))
  return path, docs, order


def help_text(config: config_dict.ConfigDict | None = None, config_file: str | None = None) -> str:
  """Usage, example, flags, the methods and every config field: `config`'s value (the defaults
  when None), the default where it differs, and the field's comment from config/defaults.py,
  the method's file (its own section) or `config_file`."""
  method = defaults.DEFAULT_METHOD if config is None else config.method
  reference = fields.flatten(defaults.get_config(method if _method_docs(method) else None))
  values = reference if config is None else fields.flatten(config)
  docs, order, sections = field_docs(_read(defaults.__file__))
  after = max(order.values(), default=0) + 1  # Then the method's own fields, then the others.
  own = _method_docs(method)
  if own:
    path, own_docs, own_order = own
    sections[after] = f"Method {method}'s own fields ({_relative(path)})"
    docs.update(own_docs)
    order.update({name: after + line for name, line in own_order.items()})
  # Lists that have one source are generated from it, not kept in a comment.
  from caedfkd_jax.io import embeddings   # numpy only: --help stays fast
  docs["method"] = ("caedfkd_jax/methods/NAME.py (docs/methods.md): " + ", ".join(registry.names())
                    + ". Each reads the fields its `reads` names; setting one it does not read is "
                    "refused.")
  docs["embeddings"] = ("a shipped table (" + ", ".join(embeddings.shipped_tables()) + ") or a "
                        "path X.npy with X.json beside it (`caedfkd embed` makes one), e.g. "
                        "NAYER's CLIP ViT-B/32 table; the methods that read it use it.")
  extra_docs = field_docs(_read(config_file))[0] if config_file else {}
  late = max(order.values(), default=0) + 1
  names = sorted(values, key=lambda name: (order.get(name, late), name))
  if any(name not in order for name in names):
    sections.setdefault(late, "Other fields" + (f" (set by {config_file})" if config_file else ""))
  source = f"{config_file} (defaults: caedfkd_jax/config/defaults.py)" if config_file else \
      "caedfkd_jax/config/defaults.py"
  out = [USAGE, "",
         "CAE-DFKD: distil a teacher bundle into a student bundle without real data. Rerunning",
         "with the same --workdir resumes from its last checkpoint.", "",
         "example:", EXAMPLE, "",
         "flags:",
         "  --config CONFIG[:ARG]  a config file's path, or an installed config's name (from any",
         "                         directory): " + ", ".join(installed_configs()) + ".",
         "                         ARG goes to the file's get_config(ARG).",
         "  --workdir DIR          checkpoints, logs, samples and the student bundle; an existing",
         "                         one is resumed.",
         "  --config.FIELD=VALUE   override one config field (below); repeatable.",
         "  -h, --help             this help; with --config or --config.method, that config's",
         "                         values and the method's own fields.", "",
         "methods (--config.method; docs/methods.md): " + ", ".join(registry.names()) + ".",
         "A method reads only some fields; setting one it does not read is refused.", "",
         f"config fields of method {method}, from {source}:"]
  pending = sorted(sections.items())
  for name in names:
    line = order.get(name, late)
    while pending and pending[0][0] <= line:
      out += ["", f"  # {pending.pop(0)[1]}"]
    out += field_lines(name, values, reference, docs.get(name) or extra_docs.get(name, ""))
  return "\n".join(out)


def field_lines(name: str, values: dict, reference: dict, doc: str) -> list[str]:
  """`--help`'s lines for one field: its value, the default where it differs, its comment."""
  field = f"  {name} = {values[name]!r}"
  if name in reference and values[name] != reference[name]:
    field += f"  (default: {reference[name]!r})"
  if not doc:
    return [field]
  if len(field) <= 38:
    return textwrap.wrap(doc, 100, initial_indent=field.ljust(40), subsequent_indent=" " * 40)
  return [field, *textwrap.wrap(doc, 100, initial_indent=" " * 40, subsequent_indent=" " * 40)]


def _relative(path: str) -> str:
  """A package file as caedfkd_jax/..., any other as given."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.abspath(path)
  return (os.path.relpath(path, os.path.dirname(package))
          if path.startswith(package + os.sep) else path)


def parse_command_line(argv: list[str], prog: str = PROG, command: str = "distill"):
  """(help?, the config flag, the workdir flag, the config file), or the exit code 2 after one
  error line (a bad flag or value, or the config file's own error)."""
  try:
    wants_help, argv, config_file = _split_argv(argv, command)
    config, workdir = _parse(argv)
  except (flags.Error, ValueError) as e:
    print(f"{prog}: error: {_one_line(e, prog)}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - the config file's own error, or an unknown field
    print(f"{prog}: error: {_parse_error(e, argv, prog, command)}", file=sys.stderr)
    return 2
  return wants_help, config, workdir, config_file


def main(argv: list[str]) -> int:
  typed = list(argv)
  parsed = parse_command_line(argv)
  if isinstance(parsed, int):
    return parsed
  wants_help, config, workdir, config_file = parsed
  if wants_help:
    if config.value is not None and _method_docs(config.value.method):   # --config.method=X
      # on a config made for another method: that method's own fields join.
      defaults.add_method_sections(config.value)
    print(help_text(config.value, config_file))
    return 0
  missing = [flag for flag, value in (("--config", config.value), ("--workdir", workdir.value))
             if value is None]
  if missing:
    print(f"{PROG}: error: {' and '.join(missing)} {'are' if len(missing) > 1 else 'is'} "
          f"required, e.g. {EXAMPLE.strip()} (`{PROG} --help` lists the config fields)",
          file=sys.stderr)
    return 2
  if not workdir_usable(PROG, workdir.value):
    return 2
  print(describe_config_file(given_config(typed[1:]) or config_file, config_file), flush=True)
  from caedfkd_jax.engine import train  # Imported late: flag errors should not wait for JAX.
  result, code = run_reporting_errors(
      PROG, lambda: train.train_and_evaluate(config.value, workdir.value), train.NonFiniteLossError)
  if code is not None:
    return code
  print(f"Student bundle: {result['student']}")
  print(stop_message(result, config.value, typed))
  return 130 if result.get("stop_reason") == "interrupted" else 0


def workdir_usable(prog: str, workdir: str) -> bool:
  """False, after one error line, when --workdir names a file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    print(f"{prog}: error: --workdir {workdir} is a file; give a directory (new, or one to "
          "resume).", file=sys.stderr)
    return False
  return True


def run_reporting_errors(prog: str, run: Callable[[], Any], non_finite_error: type[Exception]
                         ) -> tuple[Any, int | None]:
  """(run(), None); or (None, exit code) after one line for bad input (2), a non-finite loss
  (3) or a second Ctrl-C (130: the first one stops the run at its next unit, cleanly)."""
  try:
    return run(), None
  except (ValueError, FileNotFoundError) as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return None, 2
  except non_finite_error as e:
    print(f"{prog}: stopped: {e}", file=sys.stderr)
    return None, 3
  except KeyboardInterrupt as e:
    said = str(e) or ("interrupted before the next checkpoint; rerun the same command to resume "
                      "from the last one.")
    print(f"{prog}: {said}", file=sys.stderr)
    return None, 130


def stop_message(result: dict, config, typed: list[str]) -> str:
  """Where the run stands, one reason, and the exact command that continues it."""
  if not result["stopped_early"]:
    return f"Done: all {config.epochs} epochs."
  reason = result.get("stop_reason")
  where = f"epoch {result['epoch']}, unit {result.get('unit', 0)}"
  command = " ".join(shlex.quote(a) for a in ["caedfkd", "distill", *typed[1:]])
  if reason == "the time budget":
    larger = max(2 * config.time_budget_minutes, config.time_budget_minutes + 10)
    command = " ".join(shlex.quote(a) for a in ["caedfkd", "distill", *[
        a for a in typed[1:] if not a.startswith("--config.time_budget_minutes")],
        f"--config.time_budget_minutes={larger:g}"])
    head = (f"Stopped by the time budget ({config.time_budget_minutes:g} min over all "
            f"invocations) at {where} of {config.epochs} epochs")
  elif reason == "interrupted":
    head = f"Interrupted at {where}; checkpointed"
  elif reason == "stop_after_epochs":
    command = " ".join(shlex.quote(a) for a in ["caedfkd", "distill", *[
        a for a in typed[1:] if not a.startswith("--config.stop_after_epochs")],
        "--config.stop_after_epochs=0"])
    head = f"Stopped after epoch {result['epoch']} (stop_after_epochs) of {config.epochs}"
  else:
    head = f"Stopped by {reason} at {where} of {config.epochs} epochs"
  untrained = (" The student bundle holds an untrained network (no student step yet)."
               if result["epoch"] == 0 or result.get("student_steps") == 0 else "")
  return f"{head}.{untrained} To continue: {command}"


if __name__ == "__main__":
  sys.exit(main(sys.argv))
