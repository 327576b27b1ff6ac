"""Procedural scenes in NYUv2's MTAN layout: a proxy for tests and CPU studies, not a benchmark
of record. No dense dataset lives on these machines; these scenes have labels, depth and
normals known exactly, so the transfer code can be checked and compared on them.

A scene is a few planar patches before a background plane, drawn with a z-buffer. Each patch is
a turned rectangle textured with one CIFAR-10 image, its class the patch's label (classes.txt:
the CIFAR class folders, then "background"), so segmenting takes the features, not the colour.
The image is albedo times Lambertian shading (a cue to the normals), seen through haze that
thickens with depth (a cue to depth). MISSING_SHARE of the pixels have no ground truth, like
the holes in Kinect depth: depth 0, normal (0, 0, 0), label -1.

Camera: orthographic, x right, y up, z toward the viewer (OpenGL's view frame). The image spans
SCENE_WIDTH metres whatever its size in pixels. A plane has depth (distance along the view axis)
d(x, y) = depth + gx (x - cx) + gy (y - cy) metres and the normal (gx, gy, 1) / |(gx, gy, 1)|,
facing the camera: a fronto-parallel plane has constant depth and normal (0, 0, 1).
"""

import argparse
import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image

SCENE_WIDTH = 4.0           # Metres across the image.
MIN_DEPTH = 0.5             # Metres; slopes are scaled down so that no patch comes nearer.
HAZE_DEPTH = 12.0           # Metres: the image keeps exp(-depth / HAZE_DEPTH) of the surface.
HAZE_LEVEL = 0.8            # The haze's grey.
AMBIENT = 0.35              # Shading: AMBIENT + (1 - AMBIENT) * max(0, <normal, light>).
MISSING_SHARE = 0.01        # Pixels with no ground truth.
PATCHES = (2, 4)            # Patches a scene, inclusive.
TEXTURE_SPLITS = {"train": "train", "val": "test"}   # Scene split -> CIFAR split of textures.
BACKGROUND = "background"
KINDS = ("image", "label", "depth", "normal")   # MTAN's folders a split, N.npy each.


@dataclasses.dataclass(frozen=True)
class Plane:
  """A textured planar surface (module docstring: the camera). A patch covers the rectangle of
  half sizes `half_size` (metres) about `center`, turned by `angle` radians; `half_size` None
  covers the whole image (the background). `texture` (h x w x 3 in [0, 1]) spans the footprint."""
  label: int
  texture: np.ndarray
  depth: float
  slope: tuple[float, float] = (0.0, 0.0)
  center: tuple[float, float] = (0.0, 0.0)
  half_size: tuple[float, float] | None = None
  angle: float = 0.0

  def normal(self) -> np.ndarray:
    n = np.array([self.slope[0], self.slope[1], 1.0])
    return n / np.linalg.norm(n)


def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Bilinear lookup at texture coordinates u (left to right) and v (top to bottom) in [0, 1]."""
  h, w = texture.shape[:2]
  rows, cols = np.clip(v * h - 0.5, 0, h - 1), np.clip(u * w - 0.5, 0, w - 1)
  r0, c0 = np.minimum(rows.astype(int), h - 2), np.minimum(cols.astype(int), w - 2)
  fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
  top = texture[r0, c0] * (1 - fc) + texture[r0, c0 + 1] * fc
  bottom = texture[r0 + 1, c0] * (1 - fc) + texture[r0 + 1, c0 + 1] * fc
  return top * (1 - fr) + bottom * fr


def pixel_coordinates(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """x, y (metres, H x W) of the pixel centres; the image centre is (0, 0)."""
  pitch = SCENE_WIDTH / width
  x = (np.arange(width) + 0.5 - width / 2) * pitch
  y = (height / 2 - np.arange(height) - 0.5) * pitch
  return np.meshgrid(x, y)


def render(planes: Sequence[Plane], height: int, width: int,
           light: Sequence[float] = (0.0, 0.0, 1.0)) -> dict[str, np.ndarray]:
  """The nearest plane at each pixel: image, label, depth, normal in the MTAN layout (float32),
  and `surface`, the index of that plane (-1 where none covers a pixel, as for missing pixels)."""
  x, y = pixel_coordinates(height, width)
  light = np.asarray(light, np.float64) / np.linalg.norm(light)
  depth = np.full((height, width), np.inf)
  surface = np.full((height, width), -1)
  albedo = np.zeros((height, width, 3))
  for k, plane in enumerate(planes):
    dx, dy = x - plane.center[0], y - plane.center[1]
    d = plane.depth + plane.slope[0] * dx + plane.slope[1] * dy
    if plane.half_size is None:
      u = (x - x[0, 0]) / (x[0, -1] - x[0, 0])
      v = (y[0, 0] - y) / (y[0, 0] - y[-1, 0])
      inside = np.ones_like(d, bool)
    else:
      cos, sin = np.cos(plane.angle), np.sin(plane.angle)
      a, b = cos * dx + sin * dy, cos * dy - sin * dx
      hx, hy = plane.half_size
      inside = (np.abs(a) <= hx) & (np.abs(b) <= hy)
      u, v = (a + hx) / (2 * hx), (hy - b) / (2 * hy)
    front = inside & (d < depth) & (d > 0)
    depth[front], surface[front] = d[front], k
    albedo[front] = _sample(plane.texture, u[front], v[front])
  seen = surface >= 0
  normals = np.stack([p.normal() for p in planes] + [np.zeros(3)])[surface]   # -1: zeros.
  labels = np.array([p.label for p in planes] + [-1])[surface]
  depth = np.where(seen, depth, 0.0)
  shade = AMBIENT + (1 - AMBIENT) * np.maximum(normals @ light, 0.0)
  clear = np.exp(-depth / HAZE_DEPTH)[..., None]
  image = np.clip(albedo * shade[..., None] * clear + HAZE_LEVEL * (1 - clear), 0.0, 1.0)
  return {"image": image.astype(np.float32), "label": labels.astype(np.float32),
          "depth": depth[..., None].astype(np.float32), "normal": normals.astype(np.float32),
          "surface": surface}


def _read_texture(path: str) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"), np.float32) / 255.0


def random_scene(rng: np.random.Generator, height: int, width: int,
                 texture_files: Sequence[Sequence[str]]) -> tuple[list[Plane], np.ndarray]:
  """A background plane and PATCHES patches, and a light direction. Patch k's label is the class
  whose image (one of texture_files[label]) textures it; the background's is len(texture_files)."""
  half_w, half_h = SCENE_WIDTH / 2, SCENE_WIDTH * height / width / 2
  field = rng.uniform(0.2, 0.8, (3, 4, 3))   # A smooth colour field, no CIFAR class.
  planes = [Plane(len(texture_files), field, rng.uniform(5.0, 7.0),
                  (rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.6)))]   # Floor-like: farther up.
  for _ in range(rng.integers(PATCHES[0], PATCHES[1] + 1)):
    label = int(rng.integers(len(texture_files)))
    files = texture_files[label]
    texture = _read_texture(files[rng.integers(len(files))])
    half = tuple(rng.uniform(0.15, 0.3, 2) * min(half_w, half_h) * 2)
    depth, slope = rng.uniform(1.5, 4.0), rng.uniform(-0.6, 0.6, 2)
    reach = np.hypot(*slope) * np.hypot(*half)   # The most the depth varies over the patch.
    slope *= min(1.0, (depth - MIN_DEPTH) / max(reach, 1e-12))
    center = (rng.uniform(-0.8, 0.8) * half_w, rng.uniform(-0.8, 0.8) * half_h)
    planes.append(Plane(label, texture, depth, tuple(slope), center, half,
                        rng.uniform(-np.pi / 6, np.pi / 6)))
  light = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), 1.0])
  return planes, light / np.linalg.norm(light)


def _texture_files(cifar_root: str, split: str, classes: Sequence[str]) -> list[list[str]]:
  files = []
  for name in classes:
    folder = os.path.join(cifar_root, split, name)
    found = sorted(f for f in os.listdir(folder)
                   if f.lower().endswith((".jpg", ".jpeg", ".png"))) if os.path.isdir(folder) else []
    if not found:
      raise FileNotFoundError(f"{folder} holds no images: cifar_root needs CIFAR-10 as "
                              "{train,test}/<class>/*.jpg (e.g. ../shared/data/cifar10).")
    files.append([os.path.join(folder, f) for f in found])
  return files


def make_dataset(root: str, num_train: int, num_val: int, height: int, width: int,
                 cifar_root: str, seed: int = 0) -> list[str]:
  """Writes ROOT/{train,val}/{image,label,depth,normal}/N.npy and ROOT/classes.txt; returns the
  class names. Train patches are textured with CIFAR train images, val patches with CIFAR test
  images. Scene N of a split depends only on (seed, split, N), not on the counts."""
  if min(num_train, num_val) < 0 or min(height, width) < 8:
    raise ValueError(f"num_train={num_train}, num_val={num_val}, {height}x{width}: need counts "
                     ">= 0 and images of at least 8 x 8.")
  train_dir = os.path.join(cifar_root, "train")
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(f"{train_dir} does not exist: pass cifar_root, CIFAR-10 as "
                            "{train,test}/<class>/*.jpg (e.g. ../shared/data/cifar10).")
  classes = sorted(d for d in os.listdir(train_dir)
                   if not d.startswith(".") and os.path.isdir(os.path.join(train_dir, d)))
  folders = {split: {kind: os.path.join(root, split, kind) for kind in KINDS}
             for split in ("train", "val")}
  if any(os.path.isdir(f) and os.listdir(f) for split in folders.values() for f in split.values()):
    raise FileExistsError(f"{root} holds a dataset already: pass an empty root (the MTAN loader "
                          "counts the files it finds, so stale ones would be read).")
  for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
    for folder in folders[split].values():
      os.makedirs(folder, exist_ok=True)
    textures = _texture_files(cifar_root, TEXTURE_SPLITS[split], classes) if count else []
    for n in range(count):
      rng = np.random.default_rng((seed, split_id, n))
      planes, light = random_scene(rng, height, width, textures)
      scene = render(planes, height, width, light)
      missing = rng.choice(height * width, max(1, round(MISSING_SHARE * height * width)), False)
      rows, cols = np.unravel_index(missing, (height, width))
      for kind, fill in (("label", -1.0), ("depth", 0.0), ("normal", 0.0)):
        scene[kind][rows, cols] = fill
      for kind, folder in folders[split].items():
        np.save(os.path.join(folder, f"{n}.npy"), scene[kind])
  names = classes + [BACKGROUND]
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  return names


# ---------------------------------------------------------------------------
# `caedfkd dense-data`


def _size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: give HEIGHTxWIDTH, e.g. 64x64") from None
  return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="an empty folder for ROOT/{train,val}/...")
  parser.add_argument("--cifar", required=True,
                      help="CIFAR-10 as {train,test}/<class>/*.jpg (e.g. ../shared/data/cifar10)")
  parser.add_argument("--train", type=int, default=400, help="train scenes (default: 400)")
  parser.add_argument("--val", type=int, default=100, help="val scenes (default: 100)")
  parser.add_argument("--size", type=_size, default=(64, 64), help="HxW (default: 64x64)")
  parser.add_argument("--seed", type=int, default=0, help="scene N depends on (seed, split, N)")


def run(args: argparse.Namespace) -> int:
  names = make_dataset(args.out, args.train, args.val, *args.size, args.cifar, args.seed)
  print(f"{args.train} train and {args.val} val scenes of {args.size[0]}x{args.size[1]} in "
        f"{args.out} ({len(names)} classes: {', '.join(names)}). A proxy, not a benchmark: "
        f"`caedfkd transfer --data {args.out} ...` reads it.")
  return 0
