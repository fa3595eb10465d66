"""One fuzz target under atheris (libFuzzer, guided by the coverage of harpoon's code).

    PYTHONPATH=src python -m tests.fuzz.harness codec --runs 100000 [libFuzzer flags...]

Seeds the corpus (a new temporary directory unless --corpus names one) with the
target's valid inputs (tests/fuzz/seeds.py), runs the target on --runs inputs (libFuzzer
runs until stopped without it) and ends with one line, `FUZZ-RESULT {json}`: the
target, inputs run, seconds, crashing inputs and their signatures. A crash (see
tests/fuzz/targets.py) does not stop the run: it is counted by signature (exception type
and the innermost line of harpoon that raised it), its traceback printed once, and its
first inputs saved to --crash-dir as crash-<target>-<signature hash>-<n>, for a
regression test. The exit status is 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["harpoon"]):
    from tests.fuzz import seeds, targets


def parse_json_in_python() -> None:
    """json.loads through the json module's own Python scanner, instrumented: the C one
    gives libFuzzer no coverage, so a mutation that keeps a document JSON but changes a
    value's type would look like any other. Same documents, same errors."""
    import json.decoder
    import json.scanner

    for function in (
        json.scanner.py_make_scanner,
        json.decoder.py_scanstring,
        json.decoder.JSONObject,
        json.decoder.JSONArray,
    ):
        atheris.instrument_func(function)
    json.decoder.scanstring = json.decoder.py_scanstring
    json.scanner.make_scanner = json.scanner.py_make_scanner
    json._default_decoder = json.JSONDecoder()


#: Inputs of one crash signature saved, at most.
SAVED_PER_SIGNATURE = 3
#: The longest input libFuzzer makes, per target: a few frames for ttrpc (a longer
#: stream only repeats them, and cut into small chunks costs Python time per byte), a
#: whole OCI spec for the agent (the seed is ~2 KiB), a BootstrapParams for `start`.
MAX_LEN_BYTES = {
    "codec": 512,
    "protocol_server": 512,
    "protocol_client": 512,
    "agent_request": 4096,
    "shim_start": 1024,
}


def signature(error: BaseException) -> str:
    """The exception's type and where it was raised: the innermost frame in harpoon's
    code (a target's own check when the code under test broke an invariant)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/harpoon/" in f.filename or "/fuzz/" in f.filename]
    where = ours[-1] if ours else frames[-1]
    return f"{type(error).__name__} at {Path(where.filename).name}:{where.lineno} ({where.name})"


class Run:
    def __init__(
        self, name: str, target: Callable[[bytes], None], runs: int | None, crash_dir: Path
    ) -> None:
        self.name = name
        self.target = target
        self.runs = runs
        self.crash_dir = crash_dir
        self.inputs = 0
        self.crashes: Counter[str] = Counter()
        self.started = time.monotonic()

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        try:
            self.target(data)
        except Exception as error:
            self.crashed(data, error)
        if self.inputs == self.runs:
            self.finish()

    def crashed(self, data: bytes, error: Exception) -> None:
        sig = signature(error)
        self.crashes[sig] += 1
        seen = self.crashes[sig]
        if seen == 1:
            print(f"\nCRASH in {self.name}: {sig}, input {data[:200]!r}", file=sys.stderr)
            traceback.print_exception(error, file=sys.stderr)
        if seen <= SAVED_PER_SIGNATURE:
            digest = hashlib.sha1(sig.encode()).hexdigest()[:10]
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            (self.crash_dir / f"crash-{self.name}-{digest}-{seen}").write_bytes(data)

    def finish(self) -> None:
        result = {
            "target": self.name,
            "inputs": self.inputs,
            "seconds": round(time.monotonic() - self.started, 1),
            "crashing_inputs": sum(self.crashes.values()),
            "signatures": dict(self.crashes),
        }
        print(f"\nFUZZ-RESULT {json.dumps(result)}", flush=True)
        sys.stderr.flush()
        # libFuzzer would go on; its exit would skip Python's own.
        os._exit(1 if self.crashes else 0)


def seed_corpus(name: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds.SEEDS[name]()):
        (corpus / f"seed-{index}").write_bytes(seed)


def write_dictionary(name: str, where: Path) -> list[str]:
    """libFuzzer's -dict flag for the target's tokens, if it has any."""
    tokens = seeds.DICTIONARIES.get(name)
    if not tokens:
        return []
    path = where / f"{name}.dict"
    path.write_text("".join(f'"{_escape(token)}"\n' for token in tokens))
    return [f"-dict={path}"]


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(targets.TARGETS))
    parser.add_argument("--runs", type=int, help="inputs to run (default: until stopped)")
    parser.add_argument("--corpus", type=Path, help="corpus directory (default: a new one)")
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    args, libfuzzer_flags = parser.parse_known_args(argv)
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"harpoon-fuzz-{args.target}-"))
    seed_corpus(args.target, corpus)
    flags = [
        f"-max_len={MAX_LEN_BYTES[args.target]}",
        *write_dictionary(args.target, corpus.parent),
        *libfuzzer_flags,
    ]
    print(f"fuzzing {args.target}: corpus {corpus}, crashes to {args.crash_dir}", flush=True)
    parse_json_in_python()
    run = Run(args.target, targets.TARGETS[args.target], args.runs, args.crash_dir)
    atheris.Setup([sys.argv[0], *flags, str(corpus)], run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
