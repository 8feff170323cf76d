import pytest

from bifrost.config_loader import ckks_params_of, load_config
from bifrost.errors import BifrostError


def test_default_config_loads_and_is_secure():
    cfg = load_config()
    assert ckks_params_of(cfg).log_q <= 218
    assert cfg.generation.mode in ("bifrost", "bifrost+")


@pytest.mark.parametrize("text,needle", [
    ("seed: zero\n", "expected int"),
    ("generation:\n  mode: turbo\n", "generation.mode"),
    ("delegation:\n  fuse: '*'\n", "expected a list of lists"),
    ("delegation:\n  include: ['*']\n", r"unknown key\(s\) \['include'\]"),  # placement is the policy's now
    ("policy: nope\n", "unknown placement policy 'nope'"),
    ("worker:\n  colour: blue\n", "unknown key"),
    ("- 1\n- 2\n", "mapping"),
    ("model: [unclosed\n", "invalid YAML"),
    ("ckks:\n  poly_modulus_degree: 2048\n  coeff_mod_bit_sizes: [60, 60]\n", r"c\.yaml\.ckks: log2\(Q\)=120 bits exceeds"),
    ("ckks:\n  scale_bits: [1]\n", r"c\.yaml\.ckks\.scale_bits: expected int"),
])
def test_invalid_configs_are_refused_with_the_key_named(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(BifrostError, match=needle):
        load_config(p)


def test_the_ckks_section_is_the_backends_parameter_type(tmp_path):
    """One type per concept: ``ckks:`` loads as a CKKSParams, and the run's parameters are that value."""
    from bifrost.ckks.params import CKKSParams

    p = tmp_path / "c.yaml"
    p.write_text("backend: native\nckks:\n  poly_modulus_degree: 2048\n  coeff_mod_bit_sizes: [30, 24]\n  scale_bits: 33\n")
    cfg = load_config(p)
    assert cfg.ckks == CKKSParams(2048, (30, 24), 33) and ckks_params_of(cfg) is cfg.ckks


def test_config_module_reads_no_file_and_imports_no_model_code():
    """bifrost.config holds the dataclasses; loading and resolving files is bifrost.config_loader's."""
    import ast
    from pathlib import Path

    import bifrost.config as config

    source = Path(config.__file__).read_text()
    names = {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert not {"yaml", "model", "model.catalog", "model.placement", "ckks.backend", "ckks.registry"} & names
    assert "open(" not in source and "read_text" not in source
