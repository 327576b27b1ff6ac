"""`caedfkd distill`'s launcher: --help, config resolution from any directory, usage errors."""

import os
import subprocess
import sys
import tomllib

import pytest

from caedfkd_jax.cli import distill, main
from caedfkd_jax.config import defaults, fields

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO_ROOT, "configs")


def _help(capsys, *args):
  assert main.main(["distill", *args]) == 0
  out = capsys.readouterr().out
  return out, {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_config_field_with_its_default_and_comment(capsys, flag):
  out, lines = _help(capsys, flag)
  assert out.startswith("usage: caedfkd distill --config")
  assert "example:\n  caedfkd distill --config cifar10_resnet56_resnet20 --workdir" in out
  for name, value in fields.flatten(defaults.get_config()).items():
    assert name in lines, f"--help does not list {name}"
    assert f"{name} = {value!r}" in lines[name]
  assert "Path of the teacher bundle (`caedfkd convert`). Required." in lines["teacher"]
  assert "NAYER 4e-3; the paper says Adam 1e-3." in lines["generator.lr"]
  # A comment continued on the next lines is kept whole, and section headers show.
  assert "(XLA:CPU runs convs inside loops ~100x slower, measured)" in " ".join(out.split())
  assert "  # Student (Eq. 6)" in out


def test_help_imports_no_jax_and_works_from_any_directory(tmp_path):
  code = ("import sys; from caedfkd_jax.cli import main; rc = main.main(['distill', '--help']); "
          "print('JAX IMPORTED' if 'jax' in sys.modules else 'NO JAX'); sys.exit(rc)")
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert "student.cncl_weight = 0.5" in done.stdout and done.stdout.rstrip().endswith("NO JAX")


def test_help_with_a_config_shows_that_configs_values_and_overrides(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/ is not here: the installed one is used
  _, lines = _help(capsys, "--config", "cifar10_resnet56_resnet20.py", "--config.epochs=3", "-h")
  assert "num_groups = 2  (default: 8)" in lines["num_groups"]
  assert "student_arch = 'resnet20'  (default: 'resnet18')" in lines["student_arch"]
  assert "epochs = 3  (default: 120)" in lines["epochs"]
  assert "(default:" not in lines["seed"]
  _, lines = _help(capsys, "--config=configs/cifar10_resnet56_resnet20.py:full", "--help")
  assert "num_groups = 8" in lines["num_groups"] and "(default:" not in lines["num_groups"]
  _, lines = _help(capsys, "--config", "paper_cifar:cifar100,wrn40_2,wrn16_1", "--help")
  assert "embeddings = 'cifar100'" in lines["embeddings"]
  assert "student_arch = 'wrn16_1'" in lines["student_arch"]


def test_help_shows_fields_a_config_file_adds_with_its_comment(capsys, tmp_path):
  path = tmp_path / "extra.py"
  path.write_text("from caedfkd_jax.config import defaults\n\n"
                  "def get_config():\n"
                  "  config = defaults.get_config()\n"
                  "  config.my_knob = 7   # Only this file knows the knob.\n"
                  "  return config\n")
  _, lines = _help(capsys, "--config", str(path), "--help")
  assert "my_knob = 7" in lines["my_knob"] and "Only this file knows the knob." in lines["my_knob"]


@pytest.mark.parametrize("spec,name,arg", [
    ("cifar10_resnet56_resnet20", "cifar10_resnet56_resnet20", ""),
    ("cifar10_resnet56_resnet20.py:full", "cifar10_resnet56_resnet20", ":full"),
    ("configs/cifar10_resnet56_resnet20.py", "cifar10_resnet56_resnet20", ""),
    ("configs/paper_cifar.py:cifar100,wrn40_2,wrn16_1", "paper_cifar", ":cifar100,wrn40_2,wrn16_1"),
])
def test_config_names_resolve_to_the_installed_configs_from_any_directory(tmp_path, monkeypatch,
                                                                          spec, name, arg):
  monkeypatch.chdir(tmp_path)
  resolved = distill.resolve_config_path(spec)
  path = resolved.partition(":")[0]
  assert os.path.isabs(path) and os.path.isfile(path)
  assert os.path.samefile(path, os.path.join(CONFIGS, f"{name}.py"))
  assert resolved == path + arg


def test_an_existing_path_wins_over_an_installed_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("configs")
  with open("configs/paper_cifar.py", "w") as f:
    f.write("def get_config(arg=''):\n  return None\n")
  assert distill.resolve_config_path("configs/paper_cifar.py:x") == "configs/paper_cifar.py:x"
  # A mistyped folder is not silently replaced by the installed config of the same name.
  with pytest.raises(ValueError, match="there is no file .*elsewhere/paper_cifar.py"):
    distill.resolve_config_path("elsewhere/paper_cifar.py")


def test_an_unknown_config_name_lists_the_installed_configs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  installed = ("cifar10_resnet56_resnet20, cmi_cifar, cpsc_cifar, diffdfkd_cifar, paper_cifar, "
               "paper_imagenet, paper_tiny_imagenet")
  with pytest.raises(ValueError, match=installed):
    distill.resolve_config_path("cifar10_resnet56:full")
  assert main.main(["distill", "--config", "nope", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  assert err.startswith("caedfkd distill: error: --config nope: no installed config 'nope' (and "
                        "no file of that name here)") and err.endswith(installed)
  assert main.main(["distill", "--config", "nope", "--help"]) == 2   # --help does not hide it


def test_an_error_in_get_config_is_one_line(tmp_path, capsys):
  assert main.main(["distill", "--config", "paper_cifar:imagenet,a,b", "--workdir",
                    str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err
  assert err.endswith("ValueError: dataset 'imagenet': use cifar10 or cifar100")


def test_distill_without_config_or_workdir_prints_usage(tmp_path, capsys):
  assert main.main(["distill"]) == 2
  assert "--config and --workdir are required" in capsys.readouterr().err
  assert main.main(["distill", "--workdir", str(tmp_path)]) == 2
  assert main.main(["distill", "--config", "paper_cifar"]) == 2
  assert main.main(["distill", "--config"]) == 2
  assert "--config needs a value" in capsys.readouterr().err


def test_distill_trains_the_config_it_resolved_from_another_directory(tmp_path, monkeypatch):
  from caedfkd_jax.engine import train
  seen = {}
  def fake_train(config, workdir):
    seen.update(config=config, workdir=workdir)
    return {"student": os.path.join(workdir, "student"), "stopped_early": False}
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.chdir(tmp_path)
  assert main.main(["distill", "--config", "cifar10_resnet56_resnet20:full", "--workdir", "w",
                    "--config.teacher=t"]) == 0
  assert seen["workdir"] == "w" and seen["config"].teacher == "t"
  assert seen["config"].student_arch == "resnet20" and seen["config"].num_groups == 8


def test_pyproject_installs_every_package_and_the_configs():
  """Every subpackage is found (no list to keep), configs/ is installed as caedfkd_jax.configs
  (through the symlink caedfkd_jax/configs), and the shipped embedding tables travel as package
  data."""
  import setuptools as setuptools_lib
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  link = os.path.join(REPO_ROOT, "caedfkd_jax", "configs")
  assert os.path.islink(link) and os.path.samefile(link, CONFIGS)
  find = setuptools["packages"]["find"]
  found = set(setuptools_lib.find_packages(REPO_ROOT, include=find["include"]))
  on_disk = {os.path.relpath(folder, REPO_ROOT).replace(os.sep, ".")
             for folder, _, files in os.walk(os.path.join(REPO_ROOT, "caedfkd_jax"), followlinks=True)
             if "__init__.py" in files}
  assert found == on_disk and {"caedfkd_jax.configs", "caedfkd_jax.engine"} <= found
  tables = setuptools["package-data"]["caedfkd_jax.io"]
  assert {"embedding_tables/*.npy", "embedding_tables/*.json"} <= set(tables)
  assert any(name.endswith(".npy") for name in
             os.listdir(os.path.join(REPO_ROOT, "caedfkd_jax", "io", "embedding_tables")))
  assert os.path.isfile(os.path.join(CONFIGS, "__init__.py"))
  shipped = {name[:-3] for name in os.listdir(CONFIGS) if name.endswith(".py") and name[0] != "_"}
  assert set(distill.installed_configs()) | set(distill.installed_configs("train")) == shipped
  assert all(name.startswith("train_") for name in distill.installed_configs("train"))


def test_a_method_section_on_a_config_made_for_another_method_names_its_method(capsys):
  """`cmi.*` exists only in a config made for CMI (its own section): the error says so."""
  code = main.main(["distill", "--config", "cifar10_resnet56_resnet20.py", "--workdir", "w",
                        "--config.cmi.nz=5"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert ("--config.cmi.nz: the config has no section 'cmi', which only method cmi or "
          "cae_dfkd_cmi reads; use a config made for that method (its get_config calls "
          "defaults.get_config('cmi'))") in err[0]
