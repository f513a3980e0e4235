"""Atomic output: every file is written to a temporary name beside its target, then renamed over it.

A reader (or a run killed at any moment) sees the complete old file, the complete new one, or none.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medlora.errors import ConfigError


def env_int(name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer environment variable, checked: unset or empty gives `default`; anything but a whole number from
    `low` to `high` is one line naming the variable (not a traceback, and not a segfault from 99999 threads)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${name}={raw[:40]!r}: expected a whole number from {low} to {high}") from None
    if not low <= value <= high:
        raise ConfigError(f"${name}={value}: expected a whole number from {low} to {high}")
    return value


def env_folder(name: str, default: Path) -> Path:
    """A folder named by an environment variable (`default` when unset), checked: not empty, not a file."""
    if name not in os.environ:
        return default
    raw = os.environ[name]
    if not raw.strip():
        raise ConfigError(f"${name} is set but empty; unset it (default {default}) or name a folder")
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"${name}={raw[:80]}: not a folder")
    return path


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write; on success it replaces `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_file_hashes(*paths: str, root: str | Path = ".") -> dict[str, str]:
    """{path as given: sha256} for the given paths (relative ones taken from `root`) that are files (a dataset
    folder or hub name is left out)."""
    return {path: file_sha256(Path(root) / path) for path in paths if path and (Path(root) / path).is_file()}


def check_output_folder(flag: str, path: str | Path) -> None:
    """Refuse, before any work (not with a traceback after it), an output folder that is a file, that would sit
    under a file, or where nothing can be written (read-only, immutable, /proc): a file is created and removed in
    the folder, or in its nearest existing parent when it is yet to be made. Creates nothing that stays."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail with FileExistsError after all the work
            raise ConfigError(f"{flag} {path}: {existing} is a link to {os.readlink(existing)}, which does not exist")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so no folder can be made under it")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".medlora-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} ({exc.strerror or exc})") from None


def check_not_inside_inputs(flag: str, path: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse an output that is one of the inputs or lies inside an input folder: a folder read as a whole would take
    in the outputs on the next run (infer writing into its own --instruct_dir, then finetune training on them)."""
    out = Path(path).resolve()
    for input_flag, source in inputs.items():
        if not source or not Path(source).exists():
            continue  # a hub name, or nothing given
        source_path = Path(source).resolve()
        if out == source_path or (source_path.is_dir() and source_path in out.parents):
            raise ConfigError(f"{flag} {path}: lies inside the input {input_flag} {source}; write the outputs "
                              f"elsewhere")


_claims: dict[Path, int] = {}  # lock file -> its open descriptor, for the outputs this command writes


def claim_output(flag: str, path: str | Path, inputs: dict[str, str | None] | None = None,
                 folder: bool = True) -> None:
    """The one preflight of an output (a folder, or a file when `folder` is false): writable, not an input, and not
    being written by another medlora process. The claim (an exclusive lock keyed on the resolved path, in a
    per-user folder under the system's temporary folder, so that nothing is left in the user's folders) is held
    until `release_outputs` (the CLI calls it when the command ends) or the process exits."""
    check_output_folder(flag, path if folder else Path(path).parent)
    check_not_inside_inputs(flag, path, inputs or {})
    if env_int("RANK", 0, 0, 1 << 20) != 0:
        return  # the ranks of one distributed run share the output; rank 0 holds the claim for them
    import fcntl
    import hashlib

    locks = Path(tempfile.gettempdir()) / f"medlora-locks-{os.getuid()}"
    locks.mkdir(mode=0o700, exist_ok=True)
    resolved = Path(path).resolve()
    lock = locks / (hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{flag} {path}: another medlora process (pid {holder}) is writing there; wait for it "
                              f"or choose another output") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # not the file of a claim released (and unlinked) between our open and our lock
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _claims[lock] = fd


def release_outputs() -> None:
    """Give up every claim of this process (unlinked first, so that a waiting claimant re-checks the file)."""
    while _claims:
        lock, fd = _claims.popitem()
        lock.unlink(missing_ok=True)
        os.close(fd)


def read_json_object(path: str | Path, error: type = ConfigError, what: str = "a JSON object") -> dict:
    """A JSON file that must hold an object, or one `error` line naming the file (invalid JSON, another type)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({getattr(exc, 'msg', None) or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be {what}, got {type(data).__name__}")
    return data


def atomic_write_text(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_jsonl(target: str | Path, rows: Iterable[dict]) -> Path:
    with atomic_path(target) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(target)


def replace_folder_contents(staging: Path, dest: Path, last: str) -> None:
    """Move every file of `staging` into `dest`; `last` (the file that marks the folder complete) goes last.

    `last` is removed from `dest` first, so during the swap the folder never looks complete with mixed files.
    """
    marker = dest / last
    if marker.exists():
        marker.unlink()
    names = sorted(p.name for p in staging.iterdir() if p.is_file() and p.name != last)
    for name in [*names, last]:
        os.chmod(staging / name, 0o666 & ~current_umask())
        os.replace(staging / name, dest / name)


def staging_prefix(kind: str) -> str:
    """A prefix for temporary folders that names this process, so that a later run can tell a killed one's."""
    return f"{kind}{os.getpid()}-"


def remove_stale_staging(folder: Path, kind: str) -> None:
    """Remove `folder`'s entries named `<kind><pid>-...` whose process is gone: what a killed write left behind."""
    for path in Path(folder).glob(f"{kind}*"):
        pid = path.name[len(kind):].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(folder: Path, marker: str, **extra) -> None:
    """Record every file's size in `folder/marker`: written last, it says the folder is complete."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != marker}
    atomic_write_text(folder / marker, json.dumps({**extra, "files": files}, ensure_ascii=False, indent=1))


def manifest_ok(folder: Path, marker: str) -> bool:
    """The marker exists and every file it lists is present with its recorded size."""
    try:
        files = json.loads((folder / marker).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items())
