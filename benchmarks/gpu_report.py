r"""Markdown for docs/results.md from the files benchmarks/gpu_checklist.sh leaves in its folder.

  python -m benchmarks.gpu_report runs/gpu_checklist [DISTILL_WORKDIR] > gpu_results.md

Reads env.txt, bench_*.json, accuracy_metrics.jsonl (and DISTILL_WORKDIR/result.json when
given), runs_cost.json and log.txt; prints one section per step that produced a file, and names
the steps that failed or were skipped. Nothing is measured here.
"""

import json
import os
import sys
from typing import Any

BENCHES = (("bench_r56_r20.json", "resnet56 -> resnet20"),
           ("bench_r34_r18.json", "resnet34 -> resnet18 (paper pair)"))


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _bench_section(report: dict[str, Any], title: str) -> list[str]:
  batch = next((s for s in report["sides"] if s.get("name") == "caedfkd-jax"), {})
  lines = [f"### Speed, {title}", "", f"`{report['command']}`", ""]
  if batch.get("synthesis_batch"):
    lines += [(f"Synthesis batch {batch['synthesis_batch']}, KD batch {batch['kd_batch']}, "
               f"compute dtype {batch.get('compute_dtype')}, fused steps "
               f"{batch.get('fused_steps')}, epoch plan {batch.get('epoch_plan')}."), ""]
  return lines + [report["table"], ""]


def _accuracy_section(folder: str, distill_dir: str | None) -> list[str]:
  with open(os.path.join(folder, "accuracy_metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  evaluated = [r for r in rows if r.get("eval/top1") is not None]
  lines = ["### Accuracy: a short fused `caedfkd distill` from the real resnet56 teacher", ""]
  if distill_dir and os.path.exists(os.path.join(distill_dir, "result.json")):
    result = _read_json(os.path.join(distill_dir, "result.json"))
    keep = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    lines += [f"result.json: `{json.dumps(keep)}`", ""]
  lines += ["| epoch | minutes | student top-1 (test) |", "|---|---|---|"]
  for r in evaluated:
    minutes = r.get("time/minutes", r.get("minutes"))
    minutes = f"{minutes:.2f}" if isinstance(minutes, (int, float)) else "-"
    lines.append(f"| {r.get('epoch', '-')} | {minutes} | {r['eval/top1']:.2f}% |")
  if not evaluated:
    lines.append("| - | - | no evaluated epoch |")
  return lines + [""]


def _runs_cost_section(report: dict[str, Any]) -> list[str]:
  return ["### Many runs in one program (`runs_cost`)", "", f"Device: {report['device']}.", "",
          report["table"], ""]


def _diffusion_section(r: dict[str, Any]) -> list[str]:
  memory = (f" Peak memory {r['peak_bytes'] / 2**30:.1f} GiB of {r['bytes_limit'] / 2**30:.1f}; "
            f"largest batch that fits (linear estimate): {r['max_batch_estimate']}."
            if "peak_bytes" in r else "")
  return ["### DiffDFKD synthesis (`diffusion`)", "",
          f"Device: {r['device']}. {'Tiny networks (--dry). ' if r['dry'] else ''}"
          f"UNet {r['unet_params']:,} and VAE decoder {r['vae_decoder_params']:,} parameters "
          f"(random), {r['compute_dtype']}, {r.get('attention', 'xla')} attention, "
          f"{r['latent_size']}x{r['latent_size']} latents, "
          f"batch {r['batch']}, {r['denoising_steps']} guided steps a round.", "",
          "| images/s | s per round | UNet rows/s | first round (compile) s |",
          "|---|---|---|---|",
          f"| {r['images_per_s']:.2f} | {r['round_s']:.2f} | {r['unet_rows_per_s']:.1f} | "
          f"{r['first_round_s']:.1f} |", "", memory.strip(), ""]


def report(folder: str, distill_dir: str | None = None) -> str:
  lines = ["## GPU checklist (benchmarks/gpu_checklist.sh)", ""]
  env = os.path.join(folder, "env.txt")
  if os.path.exists(env):
    with open(env) as f:
      lines += ["```", f.read().strip(), "```", ""]
  for name, title in BENCHES:
    if os.path.exists(os.path.join(folder, name)):
      lines += _bench_section(_read_json(os.path.join(folder, name)), title)
  if os.path.exists(os.path.join(folder, "accuracy_metrics.jsonl")):
    lines += _accuracy_section(folder, distill_dir)
  if os.path.exists(os.path.join(folder, "diffusion_speed.json")):
    lines += _diffusion_section(_read_json(os.path.join(folder, "diffusion_speed.json")))
  if os.path.exists(os.path.join(folder, "runs_cost.json")):
    lines += _runs_cost_section(_read_json(os.path.join(folder, "runs_cost.json")))
  log = os.path.join(folder, "log.txt")
  if os.path.exists(log):
    with open(log) as f:
      notes = [line.strip() for line in f if line.startswith("[") and
               ("SKIP" in line or ("END" in line and not line.rstrip().endswith("exit 0")))]
    if notes:
      lines += ["Steps that failed or were skipped (log.txt):", ""] + [f"- `{n}`" for n in notes]
  return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
  if len(argv) not in (2, 3):
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  sys.stdout.write(report(argv[1], argv[2] if len(argv) == 3 else None))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
