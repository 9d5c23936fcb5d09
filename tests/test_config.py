import json
import re

import pytest

from conftest import REPO
from medgpt.config import Config, parse_config
from medgpt.ds_config import REDUCE_BUCKET, load_ds_config, resolve_ds_config, zero_stage
from medgpt.errors import UserError


def test_cli_wins_over_yaml_wins_over_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 0.002\ntrain:\n  micro_batch_size: 8\n  precision: fp32\n")
    cfg = parse_config(["--config", str(path), "--micro_batch_size", "3", "--long_answer", "true"])
    assert cfg.optim.lr == 0.002  # from the file
    assert cfg.train.micro_batch_size == 3  # the flag beats the file
    assert cfg.data.long_answer is True
    assert cfg.train.grad_accum == Config().train.grad_accum  # default
    assert parse_config(["--local_rank=1"]).train.precision == "bf16"  # the deepspeed launcher's flag


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  micro_batchsize: 2\n", "unknown field 'train.micro_batchsize'"),
    ("trainer:\n  seed: 1\n", "unknown section 'trainer'"),
    ("train:\n  seed: [1\n", "not valid YAML"),
    ("train:\n  precision: fp8\n", "precision 'fp8' is unknown"),
    ("train:\n  grad_accum: two\n", "train.grad_accum: expected int"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        parse_config(["--config", str(path)])


def test_all_problems_reported_together():
    with pytest.raises(UserError) as err:
        parse_config(["--micro_batch_size", "0", "--fold", "12"])
    assert "micro_batch_size must be >= 1" in str(err.value) and "fold must be 0..9" in str(err.value)


def resolve(raw, world_size=2, **flags):
    cfg = parse_config([item for k, v in flags.items() for item in (f"--{k}", str(v))])
    return resolve_ds_config(raw, cfg, world_size, total_steps=100, hidden_size=64, on_gpu=False)


def test_auto_values_come_from_the_training_config():
    raw = load_ds_config(str(REPO / "ds_configs" / "zero3.json"))
    raw["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}
    ds = resolve(raw, micro_batch_size=3, grad_accum=5, lr=0.01, weight_decay=0.1, grad_clip=0.5,
                 precision="fp32", warmup_steps=7)
    sizes = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]
    assert sizes == (3, 5, 30)
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["scheduler"]["params"]["total_num_steps"] == 100 and ds["scheduler"]["params"]["warmup_num_steps"] == 7
    assert ds["zero_optimization"]["reduce_bucket_size"] == REDUCE_BUCKET  # several blocks, not one matrix
    assert raw["train_batch_size"] == "auto"  # the user's JSON is not modified


def test_every_shipped_ds_config_resolves():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = resolve(load_ds_config(str(path)), precision="bf16")
        assert '"auto"' not in json.dumps(ds), path
        if zero_stage(ds) == 0:  # autocast over fp32 weights: DeepSpeed's bf16 wrapper off
            assert ds["bf16"]["enabled"] is False and ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
        else:
            assert ds["bf16"]["enabled"] is True and "torch_autocast" not in ds
            assert ds["bf16"]["check_grad_overflow"] is False  # a non-finite bf16 gradient: check_step stops the run


def test_zero0_clips_in_the_training_step_not_in_deepspeed():
    """DeepSpeed clips ZeRO-0's gradients one tensor at a time; medgpt.train.clip_gradients clips them
    (to --grad_clip, checked against the JSON's value as ever) with torch's foreach kernels."""
    raw = load_ds_config(str(REPO / "ds_configs" / "zero0.json"))
    assert resolve(raw, grad_clip=0.5)["gradient_clipping"] == 0.0
    raw["gradient_clipping"] = 2.0
    with pytest.raises(UserError, match=r"gradient_clipping=2\.0 disagrees with grad_clip=0\.5"):
        resolve(raw, grad_clip=0.5)


def test_half_precision_at_zero0_is_autocast_or_refused():
    raw = load_ds_config(str(REPO / "ds_configs" / "zero0.json"))
    cfg = parse_config(["--precision", "fp16"])
    with pytest.raises(UserError, match=r"precision fp16 at ZeRO-0: .* use ZeRO-1 .* or --precision bf16"):
        resolve_ds_config(raw, cfg, 1, total_steps=10, hidden_size=64, on_gpu=True)
    raw["bf16"] = {"enabled": True}
    with pytest.raises(UserError, match=r"bf16.enabled=true at ZeRO-0 .* torch autocast over fp32 weights: write "
                                        r"\"auto\" there"):
        resolve(raw, precision="bf16")


def test_a_users_bf16_overflow_check_is_kept():
    raw = load_ds_config(str(REPO / "ds_configs" / "zero2.json"))
    raw["bf16"]["check_grad_overflow"] = True
    assert resolve(raw, precision="bf16")["bf16"]["check_grad_overflow"] is True


def test_throughput_timer_is_off_unless_the_json_turns_it_on():
    """DeepSpeed's throughput timer syncs the device twice per micro-batch (medgpt/ds_config.py)."""
    raw = load_ds_config(str(REPO / "ds_configs" / "zero1.json"))
    assert resolve(raw)["timers"] == {"throughput": {"enabled": False}}
    mine = {**raw, "timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert resolve(mine)["timers"] == {"throughput": {"enabled": True, "synchronized": False}}


def test_disagreeing_values_name_both_sides():
    with pytest.raises(UserError) as err:
        resolve({"train_batch_size": 16, "gradient_clipping": 2.0}, micro_batch_size=2, grad_accum=2, grad_clip=1.0)
    text = str(err.value)
    assert "train_batch_size=16 disagrees with micro_batch_size x grad_accum x world size (2 x 2 x 2)=8" in text
    assert "gradient_clipping=2.0 disagrees with grad_clip=1.0" in text
    with pytest.raises(UserError, match=re.escape("bf16.enabled=true disagrees with precision=fp32")):
        resolve({"bf16": {"enabled": True}}, precision="fp32")
    with pytest.raises(UserError, match=re.escape("no value: zero_optimization.sub_group_size")):
        resolve({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        resolve({}, precision="fp16")


def test_timeouts_are_positive_finite_seconds():
    with pytest.raises(UserError) as err:
        parse_config(["--stop_timeout", "0", "--collective_timeout", "inf"])
    assert "stop_timeout must be a finite number of seconds > 0 (got 0.0)" in str(err.value)
    assert "collective_timeout must be a finite number of seconds > 0 (got inf)" in str(err.value)
