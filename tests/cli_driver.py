"""Run many ``torchkeep`` command lines, each in its own forked process, after importing torch
once: ``python cli_driver.py < cases.json > results.json``.

Each case is ``{"argv": [...], "cwd": "..."}``; each result ``{"rc", "stdout", "stderr"}``. A
forked child is a real separate process (its own sys.path, cwd, stdout/stderr file
descriptors), so this is the CLI as a user runs it, minus the interpreter start and the import
of torch that would otherwise dominate a test of dozens of command lines.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch  # noqa: F401 - imported once, before forking

import torchkeep.cli


def _child(argv: list[str], cwd: str, out: str, err: str) -> None:
    fo, fe = os.open(out, os.O_WRONLY), os.open(err, os.O_WRONLY)
    os.dup2(fo, 1)
    os.dup2(fe, 2)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    rc = 1
    try:
        rc = torchkeep.cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def run(cases: list[dict]) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            open(out, "w").close()
            open(err, "w").close()
            pid = os.fork()
            if pid == 0:
                _child(case["argv"], case["cwd"], out, err)
            _, status = os.waitpid(pid, 0)
            with open(out) as fo, open(err) as fe:
                results.append({"rc": os.waitstatus_to_exitcode(status), "stdout": fo.read(),
                                "stderr": fe.read()})
    return results


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
