"""run_program: a bin/ program run in this test process, for tests of its flags and its errors.

A subprocess per CLI test pays TensorFlow's import (seconds) every time; these tests check what the
program does with its flags, which is the same in this process. `run_program` executes bin/<name> as
`__main__` with the given argv, captures stdout and stderr, turns SystemExit into a return code, and then
removes the flags the program defined (absl's FLAGS is process-wide) and restores sys.argv, sys.path and
absl's verbosity. A few tests per program still run the real executable in a subprocess
(`subprocess_program`), so that exit code, single error line and the absence of a traceback are also
checked end to end.
"""

import contextlib
import io
import os
import runpy
import subprocess
import sys
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

app.define_help_flags()  # defined once per process by absl: keep them out of what a run removes


class Result(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def run_program(name: str, *argv: str) -> Result:
  """bin/<name> argv..., in this process (see the module docstring)."""
  path = os.path.join(ROOT, "bin", name)
  before = set(flags.FLAGS)
  saved_argv, saved_path, verbosity = sys.argv, list(sys.path), logging.get_verbosity()
  stdout, stderr = io.StringIO(), io.StringIO()
  code = 0
  sys.argv = [path, *argv]
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      runpy.run_path(path, run_name="__main__")
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    for flag in set(flags.FLAGS) - before:
      if flag in flags.FLAGS:
        delattr(flags.FLAGS, flag)
    flags.FLAGS.unparse_flags()
    sys.argv, sys.path[:] = saved_argv, saved_path
    logging.set_verbosity(verbosity)
  return Result(code, stdout.getvalue(), stderr.getvalue())


def subprocess_program(name: str, *argv: str, cwd: str = ROOT, timeout: int = 600) -> Result:
  """bin/<name> argv... as its own process (exit code, output and all)."""
  done = subprocess.run([sys.executable, os.path.join(ROOT, "bin", name), *argv], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  return Result(done.returncode, done.stdout, done.stderr)


def error_lines(result: Result, name: str):
  """The `<name>: error:` lines of a run's stderr."""
  return [line for line in result.stderr.strip().splitlines() if line.startswith(f"{name}: error:")]
