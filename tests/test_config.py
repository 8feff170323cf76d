import pytest

from bifrost.config import load_config
from bifrost.errors import BifrostError


def test_default_config_loads_and_is_secure():
    cfg = load_config()
    assert cfg.ckks_params().log_q <= 218
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
])
def test_invalid_configs_are_refused_with_the_key_named(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(BifrostError, match=needle):
        load_config(p)
