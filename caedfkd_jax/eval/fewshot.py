"""Few-shot draws and the two frozen-feature classifiers of `caedfkd probe`.

Pure numpy and scikit-learn, no model: features in, labels or accuracies out, so each
piece is tested on its own (see tests/probe_test.py).

- `draw_shots`: k labelled images per class, balanced and reproducible from a seed.
- `knn_votes`: cosine k-nearest-neighbour votes, chunked over the queries so that
  10k queries against 50k references stay within a few hundred MB.
- `linear_probe`: L2 multinomial logistic regression on standardised features; its C is
  chosen on held-out training data (`held_out_split`), never on the test set.
"""

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

KNN_K = 20
C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-4, 4))  # 1e-4 .. 1e3
HELD_OUT_FRACTION = 0.2      # of each class, when every class has 2 or more training images
REST_HELD_OUT_PER_CLASS = 10  # 1-shot: drawn from the rest of the training split instead
MAX_ITER = 1000


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in key])


def draw_shots(labels_N: np.ndarray, num_classes: int, shots: int, seed: int, draw: int,
               class_names: list[str] | None = None) -> np.ndarray:
  """Indices of exactly `shots` images of every class, sorted; the same for the same arguments.

  Each (seed, shots, draw) has its own random stream, so draw 1 is not a reshuffle of draw 0
  and `--shots 1` is not the first image of `--shots 10`.
  """
  if shots < 1:
    raise ValueError(f"shots={shots}: give a positive number of images per class, or all.")
  labels_N = np.asarray(labels_N)
  counts = np.bincount(labels_N, minlength=num_classes)
  short = [k for k in range(num_classes) if counts[k] < shots]
  if short:
    k = short[0]
    name = class_names[k] if class_names else str(k)
    others = (f" (and {len(short) - 1} more classes have fewer than {shots})"
              if len(short) > 1 else "")
    raise ValueError(f"{shots}-shot draws need {shots} training images of every class, but class "
                     f"{name!r} has {counts[k]}{others}; use --shots {counts.min()} or fewer.")
  rng = _rng(seed, shots, draw)
  picked = [rng.choice(np.flatnonzero(labels_N == k), shots, replace=False)
            for k in range(num_classes)]
  return np.sort(np.concatenate(picked))


def held_out_split(labels_N: np.ndarray, indices: np.ndarray, seed: int, draw: int = 0,
                   fraction: float = HELD_OUT_FRACTION,
                   rest_per_class: int = REST_HELD_OUT_PER_CLASS
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Where the linear probe's C is chosen: (fit indices, held-out indices, how, for the JSON).

  With 2 or more training images in every class, a stratified `fraction` of each class
  (at least 1, at most all but 1) is held out of `indices`. With 1 image in some class
  (1-shot) nothing can be held out of the draw, so up to `rest_per_class` images of each
  class are drawn from the rest of the training split, disjoint from `indices`: training
  data, not test data, but more labels than the draw itself (said so in the JSON).
  """
  labels_N = np.asarray(labels_N)
  indices = np.asarray(indices)
  rng = _rng(seed, len(indices), draw, 1)
  classes = np.unique(labels_N[indices])
  counts = {k: int(np.sum(labels_N[indices] == k)) for k in classes}
  if min(counts.values()) >= 2:
    held = []
    for k in classes:
      members = indices[labels_N[indices] == k]
      n_held = min(max(1, round(fraction * len(members))), len(members) - 1)
      held.append(rng.choice(members, n_held, replace=False))
    held = np.sort(np.concatenate(held))
    fit = np.setdiff1d(indices, held)
    how = {"source": "held out of the training images of the draw (stratified)",
           "fraction": fraction}
  else:
    rest = np.setdiff1d(np.arange(len(labels_N)), indices)
    held = []
    for k in classes:
      members = rest[labels_N[rest] == k]
      held.append(rng.choice(members, min(rest_per_class, len(members)), replace=False))
    held = np.sort(np.concatenate(held))
    fit = indices
    how = {"source": "drawn from the rest of the training split, disjoint from the draw",
           "per_class": rest_per_class}
  how.update(fit_images=len(fit), held_out_images=len(held))
  return fit, held, how


def _fit_logreg(features_NxD: np.ndarray, labels_N: np.ndarray, c: float):
  model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged" instead
    model.fit(features_NxD, labels_N)
  return model


def _log_loss(model, features_NxD: np.ndarray, labels_N: np.ndarray) -> float:
  """Held-out labels are classes the model was fit on (both come from the same classes)."""
  return float(log_loss(labels_N, model.predict_proba(features_NxD), labels=model.classes_))


def choose_c(fit_f: np.ndarray, fit_y: np.ndarray, held_f: np.ndarray, held_y: np.ndarray,
             grid: tuple[float, ...] = C_GRID) -> tuple[float, dict[str, float]]:
  """The C with the best held-out accuracy; ties go to the lower held-out log-loss.

  Tiny held-out sets (2 images a class at 10-shot) tie often; the log-loss breaks ties
  by how confident the right answers are rather than by grid order.
  """
  scores, keys = {}, []
  for c in grid:
    model = _fit_logreg(fit_f, fit_y, c)
    acc = float(np.mean(model.predict(held_f) == held_y) * 100)
    scores[f"{c:g}"] = acc
    keys.append((-acc, _log_loss(model, held_f, held_y), c))
  return min(keys)[2], scores


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                 test_y: np.ndarray, draw_idx: np.ndarray, fit_idx: np.ndarray,
                 held_idx: np.ndarray, grid: tuple[float, ...] = C_GRID) -> dict:
  """Top-1 (%) on the test set of logistic regression fit on `train_*[draw_idx]`.

  C is chosen by fitting `fit_idx` and scoring `held_idx` (all three index the training
  split, see `held_out_split`), then the model is refit on the whole draw with that C.
  """
  if len(held_idx):
    c, scores = choose_c(train_f[fit_idx], train_y[fit_idx], train_f[held_idx],
                         train_y[held_idx], grid)
  else:  # no training image left to hold out: scikit-learn's default, said so in the JSON
    c, scores = 1.0, {}
  model = _fit_logreg(train_f[draw_idx], train_y[draw_idx], c)
  top1 = float(np.mean(model.predict(test_f) == test_y) * 100)
  converged = bool(np.all(model[-1].n_iter_ < MAX_ITER))
  return {"top1": top1, "C": c, "held_out_top1_by_C": scores, "converged": converged}


def _unit_rows(x_NxD: np.ndarray) -> np.ndarray:
  x = np.asarray(x_NxD, np.float32).reshape(len(x_NxD), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_votes(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, num_classes: int,
              k: int = KNN_K, chunk: int = 256) -> np.ndarray:
  """Per-class votes (M x C) of the k most cosine-similar training features of each query.

  A neighbour votes with its cosine similarity. k is capped at the training set's size.
  Equal similarities at the k-th place go to the lower training index, so the neighbour
  set is well defined. Memory: a `chunk` x N similarity block at a time.
  """
  train_u, test_u = _unit_rows(train_f), _unit_rows(test_f)
  k = min(k, len(train_u))
  onehot_NxC = np.eye(num_classes, dtype=np.float32)[np.asarray(train_y)]
  votes = np.zeros((len(test_u), num_classes), np.float32)
  for start in range(0, len(test_u), chunk):
    sims = test_u[start:start + chunk] @ train_u.T                       # chunk x N
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1:k]                  # k-th largest
    above = sims > kth
    tied = sims == kth
    room = k - above.sum(1, keepdims=True)                                # tied places left
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    votes[start:start + chunk] = np.where(chosen, sims, 0.0) @ onehot_NxC
  return votes


def knn_predict(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, num_classes: int,
                k: int = KNN_K, chunk: int = 256) -> np.ndarray:
  """Class with the most similarity-weighted votes (ties: the lower class index)."""
  return np.argmax(knn_votes(train_f, train_y, test_f, num_classes, k, chunk), axis=1)
