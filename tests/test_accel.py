"""lib.accel: the speed switches (tf32, channels_last, compile) are off by default, do what they
say, and keep checkpoints interchangeable."""
from __future__ import annotations

import pytest
import torch

import train_vae
from lib.accel import apply_backend_flags, prepare_model
from lib.config import TrainConfig, VAEModelConfig, load_config
from lib.models import VAEWithLogvar
from tests.helpers import checkpoint_tensors, max_abs_diff, read_records, run_main, tiny_config


def fp32_precision() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


@pytest.mark.parametrize("name", ["configs/demo.yaml", "configs/m.yaml"])
def test_switches_are_off_in_the_shipped_configs(name):
    cfg = load_config(name)
    assert TrainConfig().channels_last is False
    for stage, tcfg in (("vae", cfg.vae.train), ("prior", cfg.prior.train)):
        # m.yaml's stage 1 runs channels_last: measured faster, same results to float rounding
        assert (tcfg.tf32, tcfg.channels_last, tcfg.compile) == (False, stage == "vae" and name == "configs/m.yaml", False)
    assert cfg.data.pin_memory is False


def test_tf32_flag_sets_matmul_and_convolution_precision():
    before = fp32_precision()
    try:
        apply_backend_flags(TrainConfig(tf32=True))
        assert fp32_precision() == ("tf32", "tf32")
        apply_backend_flags(TrainConfig())          # off: IEEE float32, also for cuDNN convolutions
        assert fp32_precision() == ("ieee", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_prepare_model_keeps_the_module_and_its_state_dict_keys():
    plain = VAEWithLogvar(VAEModelConfig(block_out_channels=[8, 16], norm_num_groups=8, layers_per_block=1), 32)
    keys = list(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    expected = plain.vae.decode(plain.vae.encode(x).latent_dist.mode()).sample

    out = prepare_model(plain, TrainConfig(channels_last=True))
    assert out is plain and list(out.state_dict()) == keys
    conv = out.vae.encoder.down_blocks[0].resnets[0].conv1.weight      # 8 -> 8 channels
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    got = out.vae.decode(out.vae.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    compiled = prepare_model(out, TrainConfig(compile=True))      # in place, compiled lazily
    assert compiled is plain and list(compiled.state_dict()) == keys
    assert compiled._compiled_call_impl is not None


def test_trainer_with_channels_last_runs_and_resumes_exactly(tmp_path, tiny_data, monkeypatch):
    """Both phases (disc_start 3) with channels_last weights and their optimizer
    (lib.optim.ChannelsLastAdamW); stopped at step 3 and resumed, the same as straight through."""
    def config(name):
        return tiny_config(tmp_path, tiny_data, f"{name}.yaml", output_dir=str(tmp_path / name),
                           **{"vae.train": {"channels_last": True, "checkpoint_every": 3, "val_every": 3}})
    assert run_main(train_vae, ["--config", config("a")], monkeypatch) == 0
    recs = read_records(tmp_path / "a" / "vae", "train")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and all(r["rec_loss"] > 0 for r in recs)
    assert run_main(train_vae, ["--config", config("b"), "--until-step", "3"], monkeypatch) == 0
    assert run_main(train_vae, ["--config", config("b"), "--resume", "latest"], monkeypatch) == 0
    last = lambda name: checkpoint_tensors(tmp_path / name / "vae" / "checkpoints" / "step-0000006")
    assert max_abs_diff(last("a"), last("b")) <= 1e-6
