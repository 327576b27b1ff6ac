"""One overwrite policy for every command that writes a file: an output that is there is refused
in one line unless --overwrite is given, the new one is swapped in whole, and it gets the
ordinary permissions (0666 less the umask), never safetensors' private 0600."""

import argparse
import importlib
import json
import os

import numpy as np
import pytest

from caedfkd_jax.cli import main
from caedfkd_jax.io import atomic_files, bundle as bundle_lib

CLASSES = ["a", "b", "c", "d"]


def refusal(command: str, flag_value: str) -> str:
  return (f"caedfkd {command}: error: --out {flag_value} exists; pass --overwrite to replace it "
          "(or choose another --out).\n")


def ordinary_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


def mode(path) -> int:
  return os.stat(path).st_mode & 0o777


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 4, 32, class_names=CLASSES)
  path = str(tmp_path_factory.mktemp("bundle") / "b")
  bundle_lib.save_bundle(path, spec, bundle_lib.init_variables(spec, 0))
  return path


@pytest.fixture(scope="module")
def checkpoint(bundle, tmp_path_factory) -> str:
  """The tiny bundle as a PyTorch state dict, written by `caedfkd export`."""
  pytest.importorskip("torch")
  out = str(tmp_path_factory.mktemp("ckpt") / "x.pt")
  assert main.main(["export", bundle, "--format", "torch", "--out", out]) == 0
  return out


# --- export ---

@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_export_refuses_an_existing_out_and_replaces_it_with_overwrite(name, bundle, tmp_path,
                                                                       capsys):
  if name.endswith(".pt"):
    pytest.importorskip("torch")
  out = tmp_path / name
  assert main.main(["export", bundle, "--out", str(out)]) == 0
  assert mode(out) == ordinary_mode()  # safetensors alone would make it 0600
  capsys.readouterr()
  out.write_bytes(b"the user's file")
  assert main.main(["export", bundle, "--out", str(out)]) == 2
  assert capsys.readouterr().err == refusal("export", str(out))
  assert out.read_bytes() == b"the user's file"
  assert main.main(["export", bundle, "--out", str(out), "--overwrite"]) == 0
  assert out.read_bytes() != b"the user's file" and mode(out) == ordinary_mode()
  assert sorted(os.listdir(tmp_path)) == [name]  # no temp files left


@pytest.mark.parametrize("fmt,name,suffix_format", [("torch", "x.safetensors", "safetensors"),
                                                    ("safetensors", "x.pth", "torch")])
def test_export_refuses_a_format_its_suffix_contradicts(fmt, name, suffix_format, bundle,
                                                        tmp_path, capsys):
  out = tmp_path / name
  assert main.main(["export", bundle, "--format", fmt, "--out", str(out)]) == 2
  assert capsys.readouterr().err == (
      f"caedfkd export: error: --format {fmt} does not match --out {out} (a {suffix_format} "
      "suffix); drop --format or change the suffix.\n")
  assert not out.exists()


def test_export_format_and_a_suffix_of_no_format(bundle, tmp_path):
  import safetensors.numpy
  out = tmp_path / "x.weights"
  assert main.main(["export", bundle, "--format", "safetensors", "--out", str(out)]) == 0
  assert "linear.weight" in safetensors.numpy.load_file(str(out))


def test_export_to_a_directory_says_so(bundle, tmp_path, capsys):
  (tmp_path / "d").mkdir()
  assert main.main(["export", bundle, "--out", str(tmp_path / "d"), "--format", "torch"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"caedfkd export: error: --out {tmp_path / 'd'} is a directory")
  assert len(err.splitlines()) == 1


# --- convert ---

def test_convert_refuses_an_existing_out_and_prints_both_hashes(checkpoint, tmp_path, capsys):
  from caedfkd_jax.engine import checkpoint as checkpoint_lib
  out = tmp_path / "teacher"
  argv = ["convert", checkpoint, "--arch", "resnet_tiny_a", "--num-classes", "4", "--out",
          str(out)]
  assert main.main(argv) == 0
  printed = capsys.readouterr().out
  loaded = bundle_lib.load_bundle(str(out))
  weights = checkpoint_lib.tree_sha256(loaded.variables)
  assert f"  file sha256    {loaded.spec.extra['source_sha256']}\n" in printed
  assert (f"  weights sha256 {weights} (what distill records as teacher_sha256)\n") in printed
  assert main.main(argv) == 2
  assert capsys.readouterr().err == refusal("convert", str(out))
  assert main.main(argv + ["--overwrite"]) == 0
  assert bundle_lib.load_bundle(str(out)).spec.arch == "resnet_tiny_a"


def test_convert_into_an_empty_folder_needs_no_overwrite(checkpoint, tmp_path):
  out = tmp_path / "empty"
  out.mkdir()
  assert main.main(["convert", checkpoint, "--arch", "resnet_tiny_a", "--num-classes", "4",
                    "--out", str(out)]) == 0
  assert bundle_lib.bundle_exists(str(out))


def test_convert_onto_a_file_is_refused_even_with_overwrite(checkpoint, tmp_path, capsys):
  out = tmp_path / "notes.txt"
  out.write_text("mine")
  argv = ["convert", checkpoint, "--arch", "resnet_tiny_a", "--num-classes", "4", "--out",
          str(out)]
  assert main.main(argv) == 2
  assert capsys.readouterr().err == refusal("convert", str(out))
  assert main.main(argv + ["--overwrite"]) == 2
  assert capsys.readouterr().err == (f"caedfkd convert: error: --out {out} is a file, not a "
                                     "bundle directory; choose another --out.\n")
  assert out.read_text() == "mine"


# --- embed ---

def test_embed_refuses_an_existing_table_before_reading_anything(tmp_path, capsys):
  """The encoder and the class file do not exist: the refusal comes before either is read."""
  npy, js = tmp_path / "t.npy", tmp_path / "t.json"
  argv = ["embed", "--classes", str(tmp_path / "missing.txt"), "--encoder",
          str(tmp_path / "no_encoder"), "--out", str(npy)]
  npy.write_bytes(b"old")
  assert main.main(argv) == 2
  assert capsys.readouterr().err == refusal("embed", str(npy))
  npy.unlink()
  js.write_text("{}")
  assert main.main(argv) == 2
  assert capsys.readouterr().err == refusal("embed", str(js))
  assert main.main(argv + ["--overwrite"]) == 2  # now it gets as far as the class file
  assert "missing.txt" in capsys.readouterr().err
  assert js.read_text() == "{}" and not npy.exists()


def test_table_save_keeps_ordinary_permissions(tmp_path):
  from caedfkd_jax.io import embeddings
  embeddings.EmbeddingTable(np.ones((2, 3)), ["a", "b"]).save(str(tmp_path / "t.npy"))
  assert mode(tmp_path / "t.npy") == mode(tmp_path / "t.json") == ordinary_mode()
  assert json.loads((tmp_path / "t.json").read_text())["classes"] == ["a", "b"]


# --- convert-diffusion ---

def test_convert_diffusion_refuses_an_existing_out_before_reading_anything(tmp_path, capsys):
  out = tmp_path / "bundle"
  out.mkdir()
  (out / "diffusion.json").write_text("{}")
  src = tmp_path / "no_such_sd_folder"  # never looked at
  assert main.main(["convert-diffusion", str(src), "--out", str(out)]) == 2
  assert capsys.readouterr().err == refusal("convert-diffusion", str(out))
  # With --overwrite it goes on, and the missing folder is what stops it; nothing is replaced.
  assert main.main(["convert-diffusion", str(src), "--out", str(out), "--overwrite"]) == 2
  assert "no_such_sd_folder is not a folder" in capsys.readouterr().err
  assert os.listdir(out) == ["diffusion.json"]


def test_convert_diffusion_overwrites_only_a_diffusion_bundle(tmp_path, capsys):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("years of work")
  assert main.main(["convert-diffusion", str(tmp_path / "sd"), "--out", str(mine),
                    "--overwrite"]) == 2
  err = capsys.readouterr().err
  assert "is not a diffusion bundle (it holds thesis.tex)" in err and len(err.splitlines()) == 1
  assert (mine / "thesis.tex").read_text() == "years of work"


# --- the shared helpers ---

def test_refuse_existing(tmp_path):
  atomic_files.refuse_existing(str(tmp_path / "absent"), False)
  (tmp_path / "empty").mkdir()
  atomic_files.refuse_existing(str(tmp_path / "empty"), False)  # nothing to lose
  (tmp_path / "f").write_text("x")
  atomic_files.refuse_existing(str(tmp_path / "f"), True)
  with pytest.raises(ValueError, match=r"^--logits .*/f exists; pass --overwrite to replace it "
                     r"\(or choose another --logits\)\.$"):
    atomic_files.refuse_existing(str(tmp_path / "f"), False, "--logits")


def test_replacing_gives_the_ordinary_mode_and_keeps_the_old_file_on_failure(tmp_path):
  import safetensors.numpy
  path = tmp_path / "w.safetensors"
  with atomic_files.replacing(str(path)) as tmp:
    safetensors.numpy.save_file({"a": np.zeros(2, np.float32)}, tmp)
  assert mode(path) == atomic_files.ordinary_mode() == ordinary_mode()
  with pytest.raises(RuntimeError):
    with atomic_files.replacing(str(path)) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise RuntimeError("killed")
  assert "a" in safetensors.numpy.load_file(str(path))
  assert os.listdir(tmp_path) == ["w.safetensors"]
  with pytest.raises(ValueError, match="is a directory"):
    atomic_files.write_text(str(tmp_path), "x")


def test_swap_in_dir_replaces_a_folder_whole(tmp_path):
  target = tmp_path / "out"
  target.mkdir()
  (target / "old.txt").write_text("old")
  new = atomic_files.temp_dir_beside(str(target))
  assert mode(new) == 0o777 & ~atomic_files.umask()  # not tempfile's private 0700
  with open(os.path.join(new, "new.txt"), "w") as f:
    f.write("new")
  atomic_files.swap_in_dir(new, str(target))
  assert os.listdir(target) == ["new.txt"]
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no backup or temp folder left


# --- help texts ---

@pytest.mark.parametrize("command", ["export", "convert", "embed", "convert-diffusion"])
def test_every_flag_of_the_file_writers_has_help(command):
  module = importlib.import_module(main.COMMANDS[command][0])
  parser = argparse.ArgumentParser()
  module.add_arguments(parser)
  for action in parser._actions:  # pylint: disable=protected-access
    assert action.help, f"caedfkd {command} {'/'.join(action.option_strings) or action.dest}"
  assert any("--overwrite" in action.option_strings for action in parser._actions)  # pylint: disable=protected-access
