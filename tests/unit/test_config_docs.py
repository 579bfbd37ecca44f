"""Every run-config field carries an attribute docstring (Megatron-Core's TransformerConfig style), and the
checkpoint section checks its own ranges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import megatron_apo.config as config_module
from megatron_apo.config import CheckpointSection, ConfigError, RunConfig, load_config

SECTIONS = ("AlgorithmConfig", "ModelSection", "ParallelConfig", "DataSection", "RolloutSection", "OptimConfig",
            "TrainerSection", "CheckpointSection", "RunConfig")


def _undocumented_fields(source: str) -> list[str]:
    """`Class.field` for every annotated field of SECTIONS not followed by a string literal (ClassVars excepted)."""
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    missing = [f"{name} (class not found)" for name in SECTIONS if name not in classes]
    for name in SECTIONS:
        body = classes[name].body if name in classes else []
        for stmt, nxt in zip(body, [*body[1:], None]):
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if "ClassVar" in ast.unparse(stmt.annotation):
                continue
            documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                          and isinstance(nxt.value.value, str) and nxt.value.value.strip())
            if not documented:
                missing.append(f"{name}.{stmt.target.id}")
    return missing


def test_every_config_field_has_a_docstring():
    missing = _undocumented_fields(Path(config_module.__file__).read_text())
    assert not missing, "config fields without an attribute docstring: " + ", ".join(missing)


def test_the_docstring_check_names_an_undocumented_field():
    src = 'class ModelSection:\n    a: int = 1\n    """doc"""\n    b: int = 2  # a comment is not a docstring\n'
    assert "ModelSection.b" in _undocumented_fields(src)
    assert "ModelSection.a" not in _undocumented_fields(src)


@pytest.mark.parametrize("override, key", [("checkpoint.save_interval=-1", "checkpoint.save_interval"),
                                           ("checkpoint.keep_last=-2", "checkpoint.keep_last")])
def test_checkpoint_ranges_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"{key} must be >= 0") and "\n" not in str(e.value)


def test_checkpoint_section_validates_itself_and_in_the_run_config():
    with pytest.raises(ConfigError, match=r"^checkpoint\.keep_last must be >= 0"):
        CheckpointSection(keep_last=-1).validate()
    cfg = RunConfig()
    cfg.checkpoint.save_interval = -5
    with pytest.raises(ConfigError, match=r"^checkpoint\.save_interval must be >= 0"):
        cfg.validate()
    load_config(None, ["checkpoint.save_interval=0", "checkpoint.keep_last=0"])  # 0s are meaningful, accepted
