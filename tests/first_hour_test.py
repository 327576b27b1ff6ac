"""What a new user meets first: class names checked where data meets a model, untrained bundles
said so, runs that say what they are and how they stopped, Ctrl-C without a traceback, and the
launcher's messages (the bad-input table holds the rest, one row per mistake)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from caedfkd_jax.cli import distill, main
from caedfkd_jax.io import bundle as bundle_lib, class_names

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# Class names
# --------------------------------------------------------------------------- #


def test_same_classes_pass_ignoring_case_underscores_and_index_prefixes():
  said = []
  class_names.check_class_names(["lawn_mower", "Sea"], ["Lawn Mower", "sea"], "data", "--x",
                                say=said.append)
  class_names.check_class_names(["zero", "one"], ["0_zero", "1_one"], "data", "--x",
                                say=said.append)
  assert said == []


@pytest.mark.parametrize("data, says", [
    (["b", "a", "c"], "holds the model's classes in another order: label 0 is 'b' but the "
                      "model's class 0 is 'a'; label 1 is 'a'"),
    (["0_b", "1_a", "2_c"], "in another order"),        # a prefix that is its index is read off
    (["x", "y", "z"], "the data's are x, y, z; the model's are a, b, c"),
    (["1_a", "0_b", "2_c"], "other classes"),          # a prefix that is not its index is a name
])
def test_other_classes_or_another_order_are_refused_naming_both(data, says):
  with pytest.raises(ValueError, match="Scores would be silently wrong") as e:
    class_names.check_class_names(["a", "b", "c"], data, "data D", "--allow-class-mismatch")
  assert says in str(e.value) and "--allow-class-mismatch" in str(e.value)


def test_the_override_turns_the_refusal_into_a_warning():
  said = []
  class_names.check_class_names(["a", "b"], ["b", "a"], "data D", "--allow-class-mismatch",
                                allow=True, say=said.append)
  assert len(said) == 1 and said[0].startswith("Warning (--allow-class-mismatch): data D holds")


def test_data_or_models_without_names_go_by_label_order_and_say_so():
  said = []
  class_names.check_class_names(["cat", "dog"], ["0", "1"], "tfds:x", "--x", say=said.append)
  class_names.check_class_names(None, ["cat", "dog"], "data", "--x", say=said.append)
  assert "names its classes only by index" in said[0] and "records no class names" in said[1]


def _bundle(path, names):
  spec = bundle_lib.ModelSpec("resnet_tiny_a", len(names), 8, class_names=names)
  return bundle_lib.save_bundle(str(path), spec, bundle_lib.init_variables(spec, 0))


def _folder(root, names, per_class=2):
  rng = np.random.default_rng(0)
  for name in names:
    os.makedirs(root / "test" / name)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          root / "test" / name / f"{i}.png")
  return str(root)


def test_evaluate_refuses_shuffled_folders_unless_told(tmp_path, capsys):
  model = _bundle(tmp_path / "m", ["airplane", "automobile", "bird"])
  data = _folder(tmp_path / "d", ["0_bird", "1_airplane", "2_automobile"])
  assert main.main(["evaluate", "--model", model, "--data", data]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "in another order" in err[0]
  assert main.main(["evaluate", "--model", model, "--data", data, "--allow-class-mismatch"]) == 0
  assert "Warning (--allow-class-mismatch)" in capsys.readouterr().out


# --------------------------------------------------------------------------- #
# Untrained bundles, stop messages
# --------------------------------------------------------------------------- #


def test_an_untrained_student_is_said_so_by_evaluate_export_and_probe(tmp_path, capsys):
  model = _bundle(tmp_path / "m", ["a", "b"])
  spec = bundle_lib.load_bundle(model).spec
  spec.extra["training"] = {"epochs_done": 0, "epochs": 16, "stop_reason": "the time budget"}
  bundle_lib.save_bundle(model, spec, bundle_lib.load_bundle(model).variables)
  warning = bundle_lib.untrained_warning(bundle_lib.load_bundle(model).spec)
  assert "0 epochs" in warning and "the time budget" in warning
  data = _folder(tmp_path / "d", ["a", "b"])
  assert main.main(["evaluate", "--model", model, "--data", data]) == 0
  assert warning in capsys.readouterr().err
  assert main.main(["export", model, "--out", str(tmp_path / "m.safetensors")]) == 0
  assert warning in capsys.readouterr().err


def test_a_stopped_distill_says_one_reason_and_the_command_that_continues():
  config = type("C", (), {"epochs": 16, "time_budget_minutes": 0.5})()
  typed = ["caedfkd distill", "--config", "x", "--workdir", "w",
           "--config.time_budget_minutes=0.5"]
  text = distill.stop_message({"stopped_early": True, "stop_reason": "the time budget",
                               "epoch": 0, "unit": 3}, config, typed)
  assert text.count("Stopped") == 1 and "untrained" in text
  assert text.endswith("To continue: caedfkd distill --config x --workdir w "
                       "--config.time_budget_minutes=10.5")
  text = distill.stop_message({"stopped_early": True, "stop_reason": "interrupted", "epoch": 2,
                               "unit": 5}, config, typed)
  assert text.startswith("Interrupted at epoch 2, unit 5; checkpointed.")
  assert text.endswith("To continue: caedfkd distill --config x --workdir w "
                       "--config.time_budget_minutes=0.5")


# --------------------------------------------------------------------------- #
# The launcher
# --------------------------------------------------------------------------- #


def test_version_and_help_of_every_subcommand_flag(capsys):
  with pytest.raises(SystemExit) as e:
    main.main(["--version"])
  assert e.value.code == 0 and capsys.readouterr().out.startswith("caedfkd ")
  import argparse
  for name, (module_name, _) in main.COMMANDS.items():
    if name in ("distill", "train"):
      continue
    parser = main.OneLineErrorParser(prog=f"caedfkd {name}")
    __import__(module_name, fromlist=["_"]).add_arguments(parser)
    bare = [a.option_strings for a in parser._actions
            if a.option_strings and not a.help and not isinstance(a, argparse._HelpAction)]
    assert not bare, f"caedfkd {name}: flags without help: {bare}"


def test_the_config_file_run_is_named(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  line = distill.describe_config_file("configs/cmi_cifar.py", distill.resolve_config_path(
      "configs/cmi_cifar.py"))
  assert line.startswith("config: installed ") and "(no configs/cmi_cifar.py in" in line
  (tmp_path / "mine.py").write_text("def get_config(): pass\n")
  assert distill.describe_config_file("mine.py", "mine.py") == f"config: {tmp_path / 'mine.py'}"


# --------------------------------------------------------------------------- #
# Ctrl-C, for real
# --------------------------------------------------------------------------- #


def test_ctrl_c_stops_train_at_a_safe_point_and_the_rerun_resumes(tmp_path):
  """SIGINT to a real `caedfkd train`: one line, exit 130, a checkpoint, and the same command
  finishes the run."""
  data = _folder(tmp_path / "d", ["a", "b"], per_class=16)
  workdir = tmp_path / "w"
  argv = [sys.executable, "-m", "caedfkd_jax", "train", "--config", "train_cifar:resnet_tiny_a",
          "--workdir", str(workdir), f"--config.data={data}", "--config.train_split=test",
          "--config.test_split=", "--config.holdout_fraction=0", "--config.batch_size=8",
          "--config.steps_per_call=1", "--config.epochs=400", "--config.compilation_cache_dir="]
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO_ROOT}
  proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 120
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  lines = [l for l in err.splitlines() if l.strip() and "step/s" not in l and "it/s" not in l
           and not l.startswith("SIGINT")]
  assert proc.returncode == 130, err
  assert "Traceback" not in err
  assert lines[-1].startswith("caedfkd train: interrupted at epoch "), err
  assert "rerun the same command to resume" in lines[-1]
  epoch = int(lines[-1].split("epoch ")[1].split(",")[0])
  assert 1 <= epoch < 400
  result = json.loads((workdir / "result.json").read_text())
  assert result["stop_reason"] == "interrupted" and result["epochs_done"] == epoch


def test_ctrl_c_in_a_command_without_checkpoints_is_one_line(monkeypatch, capsys):
  """probe, evaluate, convert...: the KeyboardInterrupt becomes one line and exit 130."""
  from caedfkd_jax.eval import probe
  def interrupted(args):
    raise KeyboardInterrupt
  monkeypatch.setattr(probe, "run", interrupted)
  assert main.main(["probe", "--model", "m", "--data", "d"]) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("caedfkd probe: interrupted")
