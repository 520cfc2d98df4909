from pathlib import Path

import pytest
import yaml

from lib.config import Config, load_config, parse_override, read_yaml
from lib.errors import ConfigError


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", ["configs/m.yaml", "configs/m_cars.yaml", "configs/demo.yaml"])
def test_shipped_configs_load_and_document_every_key(name):
    cfg = load_config(name)
    raw = read_yaml(Path(name))                  # with its base file's keys (m_cars.yaml: m.yaml's)

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out
    # every key of the resolved config appears in the shipped file (defaults documented there)
    assert keys(cfg.to_dict()) <= keys(raw)


def test_m_yaml_is_the_radiodiff_stage1_setup():
    cfg = load_config("configs/m.yaml")
    m, l, t = cfg.vae.model, cfg.vae.loss, cfg.vae.train
    assert (cfg.data.image_size, m.in_channels, m.out_channels, m.latent_channels) == (256, 1, 1, 3)
    assert m.block_out_channels == [128, 256, 512] and m.layers_per_block == 2
    assert (l.kl_weight, l.disc_weight, l.disc_start) == (1e-6, 0.5, 50001)
    assert (cfg.data.batch_size, t.lr, t.min_lr, t.max_steps) == (2, 5e-6, 5e-7, 150000)
    assert (t.checkpoint_every, t.val_every, t.log_every) == (5000, 5000, 100)


def test_demo_has_disc_start_inside_the_run():
    cfg = load_config("configs/demo.yaml")
    assert 0 < cfg.vae.loss.disc_start < cfg.vae.train.max_steps
    assert cfg.data.source == "synthetic"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, {"vae": {"train": {"lrr": 1e-4}}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "vae.train.lrr" in msg and "did you mean 'lr'" in msg
    assert "\n" not in msg


def test_mistyped_value(tmp_path):
    p = write(tmp_path, {"data": {"batch_size": "two"}})
    with pytest.raises(ConfigError, match=r"data.batch_size = 'two' has the wrong type; expected an integer"):
        load_config(p)


def test_negative_lr(tmp_path):
    p = write(tmp_path, {"vae": {"train": {"lr": -1e-4}}})
    with pytest.raises(ConfigError, match=r"vae.train.lr = -0.0001 is invalid; expected a number > 0"):
        load_config(p)


def test_warmup_not_less_than_max_steps(tmp_path):
    with pytest.raises(ConfigError, match="vae.train.warmup_steps = 10 is invalid; expected less than"):
        load_config(None, ["vae.train.max_steps=10", "vae.train.warmup_steps=10"])


def test_disc_start_beyond_max_steps_warns():
    cfg = load_config(None, ["vae.train.max_steps=100", "vae.loss.disc_start=500"])
    assert any("never train" in w for w in cfg.warnings)


def test_bad_choice_lists_valid_values():
    with pytest.raises(ConfigError, match=r"vae.train.lr_scheduler = 'cosin' is invalid; expected one of 'cosine'"):
        load_config(None, ["vae.train.lr_scheduler=cosin"])
    with pytest.raises(ConfigError, match=r"data.simulation = 'XYZ' is invalid"):
        load_config(None, ["data.simulation=[DPM, XYZ]"])


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vae:\n  train:\n    lr: 5e-6\n")       # PyYAML reads this as a string
    assert load_config(p).vae.train.lr == 5e-6


def test_off_is_accepted_where_off_is_a_value(tmp_path):
    assert load_config(None, ["data.cache=off"]).data.cache == "off"       # YAML reads off as false
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  cache: off\n")
    assert load_config(p).data.cache == "off"
    with pytest.raises(ConfigError, match=r'output_dir = False has the wrong type; expected a string \(quote it'):
        load_config(None, ["output_dir=off"])                                # not a key with an "off"


def test_flags_repeat_the_users_config_and_overrides(tmp_path):
    p = tmp_path / "my config.yaml"
    p.write_text("seed: 1\n")
    assert load_config(p, ["output_dir=/tmp/a b", "seed=2"]).flags == \
        f"--config '{p}' --set 'output_dir=/tmp/a b' --set seed=2"
    assert load_config(None).flags == ""


def test_overrides_parse_yaml_values_and_dotted_keys():
    cfg = load_config(None, ["vae.train.lr=1e-5", "data.simulation=IRT2", "vae.model.block_out_channels=[32, 64]",
                             "output_dir=/tmp/x", "data.tx_per_map=null"])
    assert cfg.vae.train.lr == 1e-5 and cfg.data.simulation == ["IRT2"]
    assert cfg.vae.model.block_out_channels == [32, 64] and cfg.output_dir == "/tmp/x"
    assert cfg.data.tx_per_map is None
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["vae.train.lr"])
    with pytest.raises(ConfigError, match="unknown key 'vae.trian'"):
        load_config(None, ["vae.trian.lr=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("vae: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line"):
        load_config(p)


def test_to_dict_round_trips(tmp_path):
    cfg = load_config("configs/demo.yaml", ["seed=7"])
    p = write(tmp_path, cfg.to_dict())
    assert load_config(p).to_dict() == cfg.to_dict()
    assert "source_path" not in cfg.to_dict() and isinstance(Config().to_dict(), dict)


def test_a_config_inherits_from_its_base_section_by_section(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, {"seed": 3, "data": {"batch_size": 4, "simulation": ["DPM", "IRT2"]},
                     "vae": {"train": {"lr": 1e-3, "max_steps": 50}}}, "base.yaml")
    child = write(tmp_path / "sub", {"base": "../base.yaml", "data": {"simulation": ["IRT2"]},
                                     "vae": {"train": {"max_steps": 70}}}, "child.yaml")
    cfg = load_config(child, ["vae.train.warmup_steps=5"])
    assert (cfg.seed, cfg.data.batch_size, cfg.data.simulation) == (3, 4, ["IRT2"])     # a list is replaced whole
    assert (cfg.vae.train.lr, cfg.vae.train.max_steps, cfg.vae.train.warmup_steps) == (1e-3, 70, 5)
    assert "base" not in cfg.to_dict()                      # runs record the resolved config


def test_m_cars_is_m_with_the_cars_keys():
    m, cars = load_config("configs/m.yaml").to_dict(), load_config("configs/m_cars.yaml").to_dict()
    assert cars["data"]["simulation"] == ["carsDPM"] and cars["data"]["cars_input"] is True
    assert cars["output_dir"] == "runs/m_cars"
    for d in (m, cars):
        del d["output_dir"]
        del d["data"]["simulation"], d["data"]["cars_input"]
    assert m == cars
    assert len(Path("configs/m_cars.yaml").read_text().splitlines()) < 20


def test_base_errors_are_one_line(tmp_path):
    a = write(tmp_path, {"base": "b.yaml"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    with pytest.raises(ConfigError, match=r"base files form a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(a)
    missing = write(tmp_path, {"base": "nope.yaml"}, "m.yaml")
    with pytest.raises(ConfigError, match=rf"^{missing}: base = '.*nope.yaml': file not found$"):
        load_config(missing)
    with pytest.raises(ConfigError, match=r"base = 3 is invalid; expected the path of another config file"):
        load_config(write(tmp_path, {"base": 3}, "n.yaml"))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(tmp_path, value):
    """An infinite LR turns every weight into NaN at the first step."""
    with pytest.raises(ConfigError, match=r"vae.train.lr = (inf|-inf|nan) is invalid; expected a finite number"):
        load_config(None, [f"vae.train.lr={value}"])
    p = tmp_path / "c.yaml"
    p.write_text(f"prior:\n  train:\n    grad_clip: {value}\n")
    with pytest.raises(ConfigError, match=rf"{p}: prior.train.grad_clip = (inf|-inf|nan) is invalid; expected a finite"):
        load_config(p)
