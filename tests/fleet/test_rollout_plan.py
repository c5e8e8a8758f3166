"""Wave planning by stable hashing, and the validation of rollout requests."""

from __future__ import annotations

import pytest

from fleet.errors import InvalidRolloutError
from fleet.rollouts.plan import device_order, plan_waves, wave_sizes
from fleet.rollouts.spec import DEFAULT_WAVES, RolloutSpec, parse_spec

DEVICES = [f"cam-{i:03d}" for i in range(200)]


@pytest.mark.parametrize(
    ("total", "sizes"),
    [
        (1000, [10, 100, 500, 1000]),
        (20, [1, 2, 10, 20]),
        (10, [1, 1, 5, 10]),
        (30, [1, 3, 15, 30]),  # 10% of 30 is exactly 3, not 4 from 3.0000000000000004
        (1, [1, 1, 1, 1]),
        (0, [0, 0, 0, 0]),
    ],
)
def test_wave_sizes_are_cumulative_ceilings_with_at_least_one_canary(
    total: int, sizes: list[int]
) -> None:
    assert wave_sizes(DEFAULT_WAVES, total) == sizes


def test_every_device_is_in_exactly_one_wave_in_hash_order() -> None:
    waves = plan_waves("digits", DEVICES, DEFAULT_WAVES)
    assert [len(w) for w in waves] == [2, 18, 80, 100]
    flat = [d for wave in waves for d in wave]
    assert sorted(flat) == sorted(DEVICES)
    assert flat == device_order("digits", DEVICES)


def test_the_canary_set_does_not_depend_on_input_order_or_on_other_devices() -> None:
    canaries = plan_waves("digits", DEVICES, DEFAULT_WAVES)[0]
    assert plan_waves("digits", list(reversed(DEVICES)), DEFAULT_WAVES)[0] == canaries
    # Devices joining or leaving never reorder the others.
    order = device_order("digits", DEVICES)
    grown = device_order("digits", [*DEVICES, "cam-new-1", "cam-new-2"])
    assert [d for d in grown if d in set(DEVICES)] == order
    shrunk = device_order("digits", DEVICES[50:])
    assert shrunk == [d for d in order if d in set(DEVICES[50:])]


def test_each_model_has_its_own_canaries() -> None:
    # Otherwise the same few devices would take every first risk for every model.
    assert device_order("digits", DEVICES)[:10] != device_order("faces", DEVICES)[:10]


def test_a_valid_request_parses_with_default_policy() -> None:
    spec = parse_spec({"model": "digits", "version": "2.0.0", "selector": {"groups": ["a"]}})
    assert isinstance(spec, RolloutSpec)
    assert spec.policy.waves == DEFAULT_WAVES
    assert spec.policy.on_failure == "abort"
    assert spec.policy.gates.max_failed_share == pytest.approx(0.1)
    assert parse_spec(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("waves", "message"),
    [
        ([1, 10, 50], "the last wave must be 100"),
        ([10, 5, 100], "must increase"),
        ([10, 10, 100], "must increase"),
        ([0, 50, 100], "percent in (0, 100]"),
        ([50, 150], "percent in (0, 100]"),
        ([], "at least 1"),
    ],
)
def test_bad_waves_are_refused_with_a_clear_message(waves: list[float], message: str) -> None:
    with pytest.raises(InvalidRolloutError, match=r"policy\.waves") as caught:
        parse_spec(
            {
                "model": "digits",
                "version": "2.0.0",
                "selector": {"groups": ["a"]},
                "policy": {"waves": waves},
            }
        )
    assert message in str(caught.value)


def test_other_bad_fields_are_named() -> None:
    with pytest.raises(InvalidRolloutError, match=r"policy\.gates\.max_failed_share"):
        parse_spec(
            {
                "model": "digits",
                "version": "2.0.0",
                "selector": {"groups": ["a"]},
                "policy": {"gates": {"max_failed_share": 2}},
            }
        )
    with pytest.raises(InvalidRolloutError, match=r"selector\.groups"):
        parse_spec({"model": "digits", "version": "2.0.0", "selector": {"groups": ["a b"]}})
    with pytest.raises(InvalidRolloutError, match="publish_rat"):
        parse_spec('{"model": "d", "version": "1", "selector": {}, "policy": {"publish_rat": 1}}')
