"""llama.cpp's own HF -> GGUF converter, taken from a registry package and run in a child process.

llama.cpp ships no PyPI package of its converter; the `gguf` package (its gguf-py) carries the file format and the
tensor-name maps but not `convert_hf_to_gguf.py` and its `conversion/` model classes. The source distribution of
llama-cpp-python on PyPI (Andrei Betlen's official bindings) vendors a whole llama.cpp checkout, so we take the
converter from there, pinned by version and sha256:

    python -m medlora.llamacpp fetch      # once per environment (`make venv` runs it): pip downloads the sdist

It is unpacked into `<sys.prefix>/share/medlora/llama.cpp-<version>/` (the converter, its `conversion/` package,
the gguf-py it was written against, llama.cpp's LICENSE). `MEDLORA_LLAMACPP_DIR` may point at another llama.cpp
checkout instead. The converter runs in a child process (`python -m medlora.llamacpp convert ...`) with its own
gguf-py first on the path: that gguf-py is newer than the pinned `gguf` package medlora itself imports, and the two
must not meet in one interpreter. Nothing here imports torch or gguf at module level.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from medlora.io import current_umask

# llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG). Its sdist's sha256, as served by PyPI:
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
KEEP = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")  # what the converter needs
MARKER = ".medlora-llamacpp.json"
ENV_DIR = "MEDLORA_LLAMACPP_DIR"
FETCH_HINT = ("python -m medlora.llamacpp fetch (`make venv` runs it; pip downloads llama-cpp-python=="
              f"{LLAMA_CPP_PYTHON_VERSION}'s source from PyPI once)")


class ConverterMissing(Exception):
    """llama.cpp's converter is not installed here."""


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "medlora" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/, or ConverterMissing."""
    if os.environ.get(ENV_DIR):
        folder = Path(os.environ[ENV_DIR])
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise ConverterMissing(f"{ENV_DIR}={folder}: no convert_hf_to_gguf.py there (a llama.cpp checkout is "
                                   f"expected)")
        return folder
    folder = default_dir()
    if not (folder / MARKER).is_file():
        raise ConverterMissing(f"llama.cpp's converter is not installed in this environment: run {FETCH_HINT}")
    return folder


# --- fetching ------------------------------------------------------------------------------------------------

def fetch(sdist: str | Path | None = None, dest: Path | None = None) -> Path:
    """Unpack the converter from the pinned sdist (downloaded with pip unless `sdist` is given); idempotent."""
    dest = dest or default_dir()
    if (dest / MARKER).is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="medlora-llamacpp-") as tmp:
        path = Path(sdist) if sdist else _download(Path(tmp))
        digest = _sha256(path)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{path}: sha256 {digest} is not the pinned {SDIST_SHA256} of {SDIST_NAME}; refusing it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            _extract(path, staging)
            (staging / MARKER).write_text(json.dumps({
                "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "llama.cpp": LLAMA_CPP_COMMIT, "sdist_sha256": digest,
            }, indent=2) + "\n", encoding="utf-8")
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes an owner-only folder
            shutil.rmtree(dest, ignore_errors=True)  # an unmarked (half-written) folder
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _download(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--dest", str(folder)]
    subprocess.run(cmd, check=True)
    found = list(folder.glob("llama_cpp_python-*.tar.gz"))
    if len(found) != 1:
        raise SystemExit(f"pip download gave {[p.name for p in folder.iterdir()]}, not {SDIST_NAME}")
    return found[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(sdist: Path, dest: Path) -> None:
    """The KEEP files of the vendored llama.cpp, as plain files (no links, nothing outside `dest`)."""
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.name.startswith(VENDOR) or not member.isfile():
                continue
            relative = member.name[len(VENDOR):]
            if not relative.startswith(KEEP) or ".." in Path(relative).parts:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)


# --- converting ----------------------------------------------------------------------------------------------

def convert(model_dir: Path, out_file: Path, outtype: str, metadata: dict[str, str], model_name: str) -> str:
    """Run llama.cpp's converter on `model_dir`, writing `out_file`, with `metadata` as extra string keys.

    Returns the converter's log; raises RuntimeError with its last error line on failure."""
    folder = converter_dir().resolve()  # the child runs there
    # beside the output (the caller's staging folder), so that whatever ends the export removes it with the rest
    metadata_json = out_file.resolve().with_name(out_file.name + ".metadata.json")
    metadata_json.write_text(json.dumps(metadata, ensure_ascii=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "medlora.llamacpp", "convert", "--converter", str(folder), "--metadata_json",
           str(metadata_json), "--", str(model_dir.resolve()), "--outfile", str(out_file.resolve()),
           "--outtype", outtype, "--model-name", model_name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": _medlora_path()}
    try:  # on an exception (Ctrl-C, SIGTERM made one by the CLI) subprocess.run kills the child before re-raising
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder, preexec_fn=die_with_parent)
    finally:
        metadata_json.unlink(missing_ok=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out_file.is_file():
        raise RuntimeError(_last_error(log) or f"the converter exited {proc.returncode}")
    return log


def die_with_parent() -> None:
    """In the child, before it runs: ask Linux to send it SIGTERM when its parent dies, even by SIGKILL (which runs
    no clean-up), so that no converter is left working for nobody. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _medlora_path() -> str:
    """PYTHONPATH for the child: where this medlora is imported from (an editable install or a checkout)."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith(("INFO:", "Writing:"))]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:240]


def _run_converter(converter: Path, metadata_json: Path, argv: list[str]) -> None:
    """In the child process: import llama.cpp's gguf-py and converter, add our keys to the header, run it."""
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    import gguf  # llama.cpp's own gguf-py, matching its converter

    if not Path(gguf.__file__).resolve().is_relative_to(converter.resolve()):
        raise SystemExit(f"error: imported gguf from {gguf.__file__}, not from {converter}")
    metadata = json.loads(metadata_json.read_text(encoding="utf-8"))
    write_header = gguf.GGUFWriter.write_header_to_file

    def write_header_with_metadata(self, *args, **kwargs):
        for key, value in metadata.items():  # the header holds the key/value count: add ours before it is written
            self.add_string(key, value)
        return write_header(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_with_metadata
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medlora.llamacpp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("fetch", help="unpack llama.cpp's converter from the pinned llama-cpp-python sdist")
    get.add_argument("--sdist", default=None, help=f"a local {SDIST_NAME} instead of downloading it with pip")
    sub.add_parser("where", help="print the converter's folder")
    run = sub.add_parser("convert", help="(internal) run the converter; arguments after -- go to it")
    run.add_argument("--converter", type=Path, required=True)
    run.add_argument("--metadata_json", type=Path, required=True)
    run.add_argument("converter_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, llama.cpp@{LLAMA_CPP_COMMIT}) in "
              f"{fetch(args.sdist)}")
    elif args.command == "where":
        try:
            print(converter_dir())
        except ConverterMissing as exc:
            print(exc, file=sys.stderr)
            return 1
    else:
        _run_converter(args.converter, args.metadata_json, [a for a in args.converter_args if a != "--"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
