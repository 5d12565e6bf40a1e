"""YARA rule sets: discover, hash, compile (in a child process), cache, version.

Theory of operation
-------------------
A rule set is every ``.yar``/``.yara`` file under a directory (recursively,
hidden entries skipped), one YARA namespace per file. Its identity is the
sha256 of the files' relative names and contents (:attr:`RuleSource`); the
short form of that hash is the ``rules_version`` reported in every verdict.

Compiling signature-base (about 5,900 rules) takes more than a second of pure C
work that holds the GIL, which would freeze the daemon's event loop. So the
daemon never compiles in-process: :func:`load_rules` hashes the sources (cheap),
and on a cache miss runs a child process (:func:`compile_command`) which
compiles, saves the compiled rules under ``<data_dir>/rules-cache/<key>.yarc``
(written atomically: temp file, fsync, rename) plus a ``<key>.json`` sidecar
with the :class:`RulesInfo`, and prints that info. Worker processes then
``yara.load()`` the cache file, which takes about a tenth of the compile time.
The cache key also covers the yara-python version and the external variable
names, because the compiled format and the rules' meaning depend on both.

Every rule set is compiled with the external variables of :data:`EXTERNALS`
defined as empty strings, so public rule sets written for LOKI/THOR compile;
workers fill them per scan from the request's metadata (:func:`externals_for`).

A compile error is a :class:`~sentinel_ipc.errors.RulesError` whose message names
the file (relative to the rules directory), the line and YARA's message:
``bad.yar:4: undefined identifier "foo"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import posixpath
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from sentinel_ipc.fsutil import atomic_write, fsync_dir

from ..errors import RulesError

#: External variables every rule set is compiled with (empty strings by default).
EXTERNALS: tuple[str, ...] = ("filename", "filepath", "extension", "filetype", "owner")

#: Rules shipped in the package, used when no rules directory is configured.
BUILTIN_RULES_DIR = Path(__file__).resolve().parent / "builtin_rules"

RULE_SUFFIXES = (".yar", ".yara")
#: Bounds on what a rules directory may hold (a rules dir is trusted, but a typo
#: such as ``--rules /`` must fail fast rather than read the whole disk).
MAX_RULE_FILES = 10_000
MAX_RULE_FILE_BYTES = 16 * 1024 * 1024
#: Compiled sets kept in the cache besides the one in use.
CACHE_KEEP = 3
CACHE_DIRNAME = "rules-cache"


class RuleSource(msgspec.Struct, frozen=True, kw_only=True):
    """One rule file: where it is, its namespace, and the hash of its contents."""

    relpath: str
    namespace: str
    path: str
    sha256: str


class RulesInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A compiled rule set as the rest of Sentinel sees it."""

    #: Short hash of the sources (names + contents): reported in verdicts and health.
    version: str
    #: Full sha256 of the sources.
    digest: str
    #: The cache key (sources digest + yara version + externals).
    key: str
    rules_dir: str
    builtin: bool
    rule_count: int
    namespaces: int
    #: Path of the compiled rules workers load.
    compiled_path: str
    #: sha256 of the compiled file, checked before a cached file is trusted.
    compiled_sha256: str
    warnings: list[str] = []
    compile_seconds: float = 0.0
    #: True when the set came from the cache instead of a fresh compile.
    cached: bool = False


class _CompileFailure(msgspec.Struct, frozen=True, kw_only=True):
    error: str


_info_decoder = msgspec.json.Decoder(RulesInfo)
_failure_decoder = msgspec.json.Decoder(_CompileFailure)


def _yara_version() -> str:
    try:
        return importlib.metadata.version("yara-python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs
        return "unknown"


# ---------------------------------------------------------------------------
# Discovery and hashing (pure file reads; no yara import)
# ---------------------------------------------------------------------------


def discover_rule_files(rules_dir: str | os.PathLike[str]) -> list[RuleSource]:
    """Every rule file under ``rules_dir``, sorted, with namespaces and hashes.

    The namespace is the relative path without its suffix (``apt/foo.yar`` ->
    ``apt/foo``); should two files differ only by suffix, both keep the suffix.

    Raises RulesError when the directory is missing, holds no rule file, holds
    too many, or a file is unreadable or too large.
    """
    root = Path(rules_dir)
    if not root.is_dir():
        raise RulesError(f"rules directory {str(root)!r} does not exist or is not a directory")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(RULE_SUFFIXES):
                continue
            full = Path(dirpath) / name
            found.append((full.relative_to(root).as_posix(), full))
            if len(found) > MAX_RULE_FILES:
                raise RulesError(f"{root}: more than {MAX_RULE_FILES} rule files")
    if not found:
        raise RulesError(f"no .yar/.yara files under {str(root)!r}")
    found.sort()
    stems = [posixpath.splitext(rel)[0] for rel, _ in found]
    sources = []
    for (rel, full), stem in zip(found, stems, strict=True):
        namespace = stem if stems.count(stem) == 1 else rel
        try:
            size = full.stat().st_size
            if size > MAX_RULE_FILE_BYTES:
                raise RulesError(f"{rel}: {size} bytes, over the {MAX_RULE_FILE_BYTES}-byte limit")
            data = full.read_bytes()
        except OSError as exc:
            raise RulesError(f"{rel}: cannot read: {exc.strerror or exc}") from exc
        sources.append(
            RuleSource(
                relpath=rel,
                namespace=namespace,
                path=str(full.resolve()),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return sources


def sources_digest(sources: list[RuleSource]) -> str:
    """sha256 over the (relative name, content hash) of every file, in order."""
    h = hashlib.sha256(b"sentinel-rules-v1\0")
    for src in sources:
        h.update(src.relpath.encode() + b"\0" + src.sha256.encode() + b"\n")
    return h.hexdigest()


def cache_key(digest: str) -> str:
    """The compiled-cache key: the sources plus what changes the compiled bytes."""
    h = hashlib.sha256(digest.encode())
    h.update(b"\0yara-python=" + _yara_version().encode())
    h.update(b"\0externals=" + ",".join(EXTERNALS).encode())
    return h.hexdigest()[:32]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_rules(
    rules_dir: str | None, cache_dir: Path
) -> tuple[list[RuleSource], RulesInfo | None]:
    """Hash the sources and return the cached compiled set if one is valid."""
    sources = discover_rule_files(rules_dir or BUILTIN_RULES_DIR)
    key = cache_key(sources_digest(sources))
    meta = cache_dir / f"{key}.json"
    try:
        info = _info_decoder.decode(meta.read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return sources, None
    try:
        if _file_sha256(info.compiled_path) != info.compiled_sha256:
            return sources, None
    except OSError:
        return sources, None
    with contextlib.suppress(OSError):
        os.utime(meta)  # LRU order for pruning
    return sources, msgspec.structs.replace(info, cached=True)


# ---------------------------------------------------------------------------
# Compiling (imports yara: runs in the compile child process, or in tools)
# ---------------------------------------------------------------------------

_YARA_ERROR = re.compile(r"^(?P<file>.*)\((?P<line>\d+)\): (?P<msg>.*)$", re.DOTALL)
_YARA_LINE_ERROR = re.compile(r"^line (?P<line>\d+): (?P<msg>.*)$", re.DOTALL)


def format_compile_error(message: str, sources: list[RuleSource]) -> str:
    """Turn YARA's ``/abs/path/x.yar(4): msg`` into ``x.yar:4: msg``."""
    m = _YARA_ERROR.match(message)
    if not m:
        return message
    file = m["file"]
    for src in sources:
        if file in (src.path, src.relpath, src.namespace):
            file = src.relpath
            break
    return f"{file}:{m['line']}: {m['msg']}"


def _format_warning(warning: str, sources: list[RuleSource]) -> str:
    return format_compile_error(warning, sources)


def compile_to_cache(sources: list[RuleSource], rules_dir: str, builtin: bool,
                     cache_dir: Path) -> RulesInfo:
    """Compile ``sources`` with YARA and store the result in ``cache_dir``.

    Synchronous and GIL-heavy: the daemon calls it through
    :func:`compile_in_subprocess`. Raises RulesError naming file:line: message.
    """
    import yara  # local: only compile children and workers import yara

    digest = sources_digest(sources)
    key = cache_key(digest)
    started = time.perf_counter()
    try:
        compiled = yara.compile(
            filepaths={src.namespace: src.path for src in sources},
            externals=dict.fromkeys(EXTERNALS, ""),
        )
    except yara.SyntaxError as exc:
        raise RulesError(format_compile_error(str(exc), sources)) from None
    except yara.Error as exc:
        raise RulesError(format_compile_error(str(exc), sources)) from None
    seconds = time.perf_counter() - started
    rule_count = sum(1 for _ in compiled)
    namespaces = len(sources)
    warnings = [_format_warning(w, sources) for w in (compiled.warnings or [])]

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{key}.yarc"
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".compile-", suffix=".tmp")
    os.close(fd)
    try:
        compiled.save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        compiled_sha = _file_sha256(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    info = RulesInfo(
        version=digest[:12],
        digest=digest,
        key=key,
        rules_dir=rules_dir,
        builtin=builtin,
        rule_count=rule_count,
        namespaces=namespaces,
        compiled_path=str(target),
        compiled_sha256=compiled_sha,
        warnings=warnings[:200],
        compile_seconds=round(seconds, 3),
    )
    atomic_write(cache_dir / f"{key}.json", msgspec.json.encode(info))
    fsync_dir(cache_dir, strict=False)
    return info


def prune_cache(cache_dir: Path, keep_key: str, keep: int = CACHE_KEEP) -> None:
    """Delete all but the ``keep`` most recently used compiled sets (never ``keep_key``)."""
    try:
        metas = sorted(cache_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    kept = 0
    for meta in metas:
        key = meta.stem
        if key == keep_key:
            continue
        if kept < keep:
            kept += 1
            continue
        for path in (cache_dir / f"{key}.yarc", meta):
            with contextlib.suppress(OSError):
                path.unlink()
    for stale in cache_dir.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink()


# ---------------------------------------------------------------------------
# The daemon side
# ---------------------------------------------------------------------------


# The compile child imports this module without running ``sentinel_ipc/__init__``
# (which pulls in the client library and trio: most of a second of start-up):
# a bare package object stands in for it, and only errors, msgspec and yara load.
_COMPILE_BOOTSTRAP = """\
import sys, types
pkg = types.ModuleType("sentinel_ipc")
pkg.__path__ = [sys.argv[1]]
sys.modules["sentinel_ipc"] = pkg
from sentinel_ipc.scanning.rules import _main
sys.exit(_main(sys.argv[2:]))
"""


def compile_command(rules_dir: str | None, cache_dir: Path) -> list[str]:
    """``python -c <bootstrap> <package dir> --cache-dir ... [--rules ...]``."""
    package_dir = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-c", _COMPILE_BOOTSTRAP, package_dir, "--cache-dir", str(cache_dir)]
    if rules_dir is not None:
        cmd += ["--rules", rules_dir]
    return cmd


def decode_compile_output(stdout: bytes, stderr: bytes, returncode: int) -> RulesInfo:
    """The compile child's answer: a RulesInfo, or a RulesError to raise."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else b""
    try:
        if returncode == 0:
            return _info_decoder.decode(last)
        failure = _failure_decoder.decode(last)
    except (msgspec.DecodeError, msgspec.ValidationError):
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RulesError(
            f"rule compiler exited with status {returncode}: {' | '.join(tail) or 'no output'}"
        ) from None
    raise RulesError(failure.error)


def compile_in_subprocess(rules_dir: str | None, cache_dir: Path,
                          timeout: float = 300.0) -> RulesInfo:
    """Blocking variant of the daemon's compile step (tools and tests)."""
    proc = subprocess.run(
        compile_command(rules_dir, cache_dir),
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return decode_compile_output(proc.stdout, proc.stderr, proc.returncode)


def load_rules_sync(rules_dir: str | None, cache_dir: Path) -> RulesInfo:
    """Cache hit, else compile in this process. For tools and the compile child."""
    sources, info = cached_rules(rules_dir, cache_dir)
    if info is not None:
        return info
    root = rules_dir or str(BUILTIN_RULES_DIR)
    return compile_to_cache(sources, root, rules_dir is None, cache_dir)


def externals_for(url: str | None, filename: str | None) -> dict[str, str]:
    """External variables from a request's metadata (LOKI/THOR conventions).

    ``filepath`` is the full name the client gave (else the URL's path),
    ``filename`` its base name, ``extension`` the lowercased last suffix with its
    dot (``.exe``). ``filetype`` is filled by the worker from the content's magic;
    ``owner`` stays empty (the daemon does not know the file's owner).
    """
    full = filename or ""
    if not full and url:
        path = url.split("#", 1)[0].split("?", 1)[0]
        if "://" in path:
            path = path.split("://", 1)[1]
            path = path[path.find("/"):] if "/" in path else ""
        full = path
    full = full[:4096].replace("\0", "")
    base = re.split(r"[\\/]", full)[-1]
    ext = ""
    dot = base.rfind(".")
    if dot > 0 and dot < len(base) - 1:
        ext = base[dot:].lower()
    return {"filename": base, "filepath": full, "extension": ext, "filetype": "", "owner": ""}


async def load_rules(rules_dir: str | None, cache_dir: Path, *,
                     compile_timeout: float = 300.0) -> RulesInfo:
    """Hash the sources (in a thread); on a cache miss compile in a child process.

    Never blocks the event loop on YARA. Raises RulesError (file:line: message).
    """
    import trio

    _sources, info = await trio.to_thread.run_sync(cached_rules, rules_dir, cache_dir)
    if info is not None:
        return info
    with trio.move_on_after(compile_timeout) as scope:
        proc = await trio.run_process(
            compile_command(rules_dir, cache_dir),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            )
    if scope.cancelled_caught:
        raise RulesError(f"rule compilation took longer than {compile_timeout:.0f} s")
    return decode_compile_output(proc.stdout, proc.stderr, proc.returncode)


def _main(argv: list[str] | None = None) -> int:
    """The compile child: ``[--rules DIR] --cache-dir DIR [--force]`` (also runnable
    as ``python -m sentinel_ipc.scanning.rules``).

    Prints one JSON line: the RulesInfo, or ``{"error": "file:line: message"}``
    (exit status 2).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="sentinel_ipc.scanning.rules")
    parser.add_argument("--rules", default=None)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--force", action="store_true", help="recompile even on a cache hit")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir)
    try:
        if args.force:
            sources = discover_rule_files(args.rules or BUILTIN_RULES_DIR)
            info = compile_to_cache(sources, args.rules or str(BUILTIN_RULES_DIR),
                                    args.rules is None, cache_dir)
        else:
            info = load_rules_sync(args.rules, cache_dir)
    except RulesError as exc:
        sys.stdout.buffer.write(msgspec.json.encode(_CompileFailure(error=exc.message)) + b"\n")
        return 2
    sys.stdout.buffer.write(msgspec.json.encode(info) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
