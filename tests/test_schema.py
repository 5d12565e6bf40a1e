"""protocol/ is generated from the message types and must not drift from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import msgspec
import pytest

from sentinel_ipc import schema
from sentinel_ipc.errors import ErrorCode
from sentinel_ipc.messages import REPLY_TYPES, REQUEST_TYPES, type_tag


def test_generated_protocol_files_are_fresh() -> None:
    stale = schema.stale_files()
    assert not stale, (
        f"stale generated files {[str(p) for p in stale]}: "
        "run `python -m sentinel_ipc.schema` and commit the result"
    )


def test_protocol_md_has_the_generated_section_and_every_error_code() -> None:
    text = (schema.PROTOCOL_DIR / "PROTOCOL.md").read_text()
    assert text.count(schema.BEGIN_MARKER) == 1 and text.count(schema.END_MARKER) == 1
    codes = [v for k, v in vars(ErrorCode).items() if k.isupper()]
    missing = [c for c in codes if f"| `{c}` |" not in text]
    assert not missing, f"error codes without a row in PROTOCOL.md's table: {missing}"


def test_check_flag_fails_on_missing_or_edited_files_and_passes_after_generation(
    tmp_path: Path,
) -> None:
    (tmp_path / "PROTOCOL.md").write_text(
        f"# title\n\n{schema.BEGIN_MARKER}\nold tables\n{schema.END_MARKER}\n\ntail\n"
    )
    assert schema.main(["--out", str(tmp_path), "--check"]) == 1
    assert not (tmp_path / "schema.json").exists()  # --check writes nothing

    assert schema.main(["--out", str(tmp_path)]) == 0
    assert schema.main(["--out", str(tmp_path), "--check"]) == 0
    protocol = (tmp_path / "PROTOCOL.md").read_text()
    assert protocol.startswith("# title\n\n") and protocol.endswith("\n\ntail\n")
    assert "old tables" not in protocol and "#### `scan_result` (ScanResult)" in protocol

    vectors = tmp_path / "vectors.json"
    vectors.write_text(vectors.read_text().replace('"ping"', '"pong"', 1))
    assert schema.main(["--out", str(tmp_path), "--check"]) == 1


def test_cli_check_on_the_repository_and_determinism_across_hash_seeds(tmp_path: Path) -> None:
    """The real command, in fresh interpreters with different hash seeds."""
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-m", "sentinel_ipc.schema", "--out", str(out)],
            check=True,
            env=env,
            capture_output=True,
        )
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    check = subprocess.run(
        [sys.executable, "-m", "sentinel_ipc.schema", "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def _load(name: str) -> object:
    return json.loads((schema.PROTOCOL_DIR / name).read_text())


def test_schema_has_every_message_type_under_its_union() -> None:
    doc = _load("schema.json")
    assert isinstance(doc, dict)
    defs = doc["$defs"]
    for union, types in (("Request", REQUEST_TYPES), ("Reply", REPLY_TYPES)):
        mapping = defs[union]["discriminator"]["mapping"]
        assert defs[union]["discriminator"]["propertyName"] == "type"
        assert set(mapping) == {type_tag(t) for t in types}
        for tag, ref in mapping.items():
            name = ref.rsplit("/", 1)[-1]
            assert defs[name]["properties"]["type"] == {"enum": [tag]}
            assert "id" in defs[name]["required"]


def test_every_message_type_has_a_valid_vector_that_agrees_with_the_schema() -> None:
    vectors = _load("vectors.json")
    doc = _load("schema.json")
    assert isinstance(vectors, list) and isinstance(doc, dict)
    defs = doc["$defs"]
    seen: dict[str, set[str]] = {"request": set(), "reply": set()}
    for vector in vectors:
        if not vector["valid"]:
            continue
        message = vector["message"]
        seen[vector["direction"]].add(message["type"])
        union = defs["Request" if vector["direction"] == "request" else "Reply"]
        ref = union["discriminator"]["mapping"][message["type"]]
        component = defs[ref.rsplit("/", 1)[-1]]
        assert set(component["required"]) <= set(message)
        if vector["canonical"]:
            assert set(message) == set(component["properties"])
    assert seen["request"] == {type_tag(t) for t in REQUEST_TYPES}
    assert seen["reply"] == {type_tag(t) for t in REPLY_TYPES}


def test_invalid_vectors_cover_the_required_failure_kinds() -> None:
    vectors = _load("vectors.json")
    assert isinstance(vectors, list)
    names = {v["name"] for v in vectors if not v["valid"]}
    required = {
        "truncated_header",
        "oversized_length",
        "not_msgpack",
        "msgpack_array_not_map",
        "unknown_type",
        "missing_field",
        "wrong_field_type",
        "id_wrong_type",
    }
    assert required <= names


def test_a_message_type_without_an_example_still_gets_a_vector() -> None:
    class Probe(msgspec.Struct, tag_field="type", tag="probe", kw_only=True):
        id: int
        name: str
        blob: bytes
        mode: Literal["a", "b"]
        nested: list[int] = []

    made = schema.synthesize(Probe)
    assert made == Probe(id=1, name="x", blob=b"\x00", mode="a")


def test_tables_in_protocol_md_name_every_message_and_field() -> None:
    tables = schema.render_tables()
    for cls in (*REQUEST_TYPES, *REPLY_TYPES):
        assert f"#### `{type_tag(cls)}` ({cls.__name__})" in tables
        for field in msgspec.structs.fields(cls):
            assert f"| `{field.encode_name}` |" in tables


@pytest.mark.parametrize("name", ["schema.json", "vectors.json"])
def test_generated_json_ends_with_newline_and_is_stable_text(name: str) -> None:
    text = (schema.PROTOCOL_DIR / name).read_text()
    assert text.endswith("}\n") or text.endswith("]\n")
    assert json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n" == text
