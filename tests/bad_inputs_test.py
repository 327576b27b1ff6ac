"""Every bad input of benchmarks/bad_inputs.py, through the real CLI: exit code 2, one line on
stderr that names the bad value, and no traceback.

The cases run once for the module (two at a time, about a minute and a half on 2 cores) and each
is then checked by its own test, so a failure names its case.
"""

import os

import pytest

from benchmarks import bad_inputs


def _in_process(case: bad_inputs.Case) -> bool:
  """distill and train cases but the resume ones run here, not in a process of their own: a JAX start-up
  less each (their one line is checked all the same; convert, evaluate and the rest stay real
  processes, so a crash or a traceback shows as the user sees it)."""
  return case.argv[0] in ("distill", "train") and "{resume_dir}" not in case.argv


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, bad_inputs.Outcome]:
  root = str(tmp_path_factory.mktemp("bad_inputs"))
  results = bad_inputs.run_cases(bad_inputs.CASES, root, jobs=2, timeout_s=180,
                                 in_process=_in_process)
  assert not os.path.exists(os.path.join(root, "evil_ran"))  # EVIL_CKPT never ran
  return {o.case.name: o for o in results}


def test_case_names_are_unique():
  names = [case.name for case in bad_inputs.CASES]
  assert len(names) == len(set(names))


@pytest.mark.slow
@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda case: case.name)
def test_bad_input_gets_one_line_naming_it(outcomes, case):
  outcome = outcomes[case.name]
  shown = "\n".join(outcome.lines)
  assert outcome.code == case.code, f"exit {outcome.code}, stderr:\n{shown}"
  assert not outcome.traceback, shown
  assert len(outcome.lines) == 1, shown
  assert outcome.expected in outcome.lines[0]


@pytest.mark.slow
def test_the_table_has_a_row_per_case(outcomes):
  table = bad_inputs.markdown_table(list(outcomes.values()))
  assert table.count("\n") == len(bad_inputs.CASES) + 1
  assert "Traceback" not in table and "/tmp" not in table   # temp paths become placeholders
