import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.protocol.errors import DecodeError, UnknownMask
from fedprune.protocol.layout import ModelLayout, TensorSpec
from fedprune.protocol.sparse import (
    MaskCode, MaskStore, SparseParams, ValueDtype, decode_masks, decode_values, encode_masks, encode_values,
    mask_from_wire, mask_to_wire, masks_from_wire, masks_to_wire, values_from_wire, values_to_wire,
)
from fedprune.protocol.quantise import quantise
from fedprune.protocol.wire import DEFAULT_LIMITS, TailReader, TailWriter, pack, unpack

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40)


def _wire(entry):
    return unpack(pack(entry), DEFAULT_LIMITS, "test")  # what the peer actually parses


def _values_round_trip(v, dtype):
    tail = TailWriter()
    entry = values_to_wire(v, dtype, tail)
    reader = TailReader(memoryview(b"".join(tail.parts)))
    out = values_from_wire(_wire(entry), "v", v.size, reader)
    reader.finish("v")
    return entry, out


@given(mask=hnp.arrays(bool, shapes))
def test_any_mask_round_trips_in_its_smallest_encoding(mask):
    entry = mask_to_wire(mask)
    spec = TensorSpec("w", mask.shape, masked=True)
    np.testing.assert_array_equal(mask_from_wire(_wire(entry), spec), mask)
    nnz, size = int(mask.sum()), mask.size
    sizes = {MaskCode.BITMAP: (size + 7) // 8}
    gaps = np.diff(np.flatnonzero(mask), prepend=0)
    if nnz:
        sizes[MaskCode.DELTA] = nnz * (1 if gaps.max() < 256 else 2 if gaps.max() < 65536 else 4)
    payload = sum(len(x) for x in entry if isinstance(x, bytes))
    if nnz in (0, size):
        assert payload == 0
    else:
        assert payload == min(sizes.values())


@pytest.mark.parametrize(
    "density, code", [(0.0, MaskCode.EMPTY), (1.0, MaskCode.FULL), (0.5, MaskCode.BITMAP), (0.002, MaskCode.DELTA)]
)
def test_each_mask_encoding_is_chosen_where_it_is_smallest(rng, density, code):
    mask = rng.random((300, 100)) < density
    assert mask_to_wire(mask)[0] == code
    np.testing.assert_array_equal(mask_from_wire(_wire(mask_to_wire(mask)), TensorSpec("w", (300, 100), True)), mask)


def test_wide_gaps_use_wider_deltas():
    mask = np.zeros(300_000, bool)
    mask[[5, 70_005, 299_999]] = True
    entry = mask_to_wire(mask)
    assert entry[:2] == [MaskCode.DELTA, 4]
    np.testing.assert_array_equal(mask_from_wire(entry, TensorSpec("w", (300_000,), True)), mask)


@pytest.mark.parametrize(
    "entry",
    [
        [MaskCode.BITMAP, b"\xff"], [MaskCode.BITMAP, b"\xff\xff"], [MaskCode.DELTA, 3, b"\x00\x00\x00"],
        [MaskCode.DELTA, 1, b"\x01\x00"], [MaskCode.DELTA, 1, b"\x0a"], [MaskCode.DELTA, 1, b""], [7], [],
        [MaskCode.FULL, b""], [True], [MaskCode.DELTA, 2, b"\x00"],
    ],
)
def test_malformed_masks_are_decode_errors(entry):
    with pytest.raises(DecodeError):
        mask_from_wire(entry, TensorSpec("w", (2, 5), True))


def test_xor_basis_is_used_when_a_readjust_moves_few_positions(rng):
    layout = ModelLayout((TensorSpec("w", (200, 200), True),))
    base = {"w": rng.random((200, 200)) < 0.5}
    new = {"w": base["w"].copy()}
    new["w"][0, :3] = ~new["w"][0, :3]
    wire = masks_to_wire(layout, new, base)
    assert wire[0][0] == 1 and len(wire[0][1][2]) == 3
    np.testing.assert_array_equal(masks_from_wire(_wire(wire), layout, base)["w"], new["w"])
    with pytest.raises(UnknownMask):
        masks_from_wire(wire, layout, None)




@given(data=st.data(), dense=st.booleans())
def test_float32_values_round_trip_bit_exact_including_negative_zero_and_inf(data, dense):
    shape = data.draw(shapes)
    values = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False)))
    layout = ModelLayout((TensorSpec("w", shape, masked=not dense),))
    mask = data.draw(hnp.arrays(bool, shape)) if not dense else None
    masks = {} if dense else {"w": mask}
    params = {"w": values if dense else np.where(mask, values, np.float32(0))}
    sp = SparseParams.from_dense(layout, params, masks)
    out = decode_values(encode_values(sp, ValueDtype.FLOAT32), layout, masks)
    assert out.values["w"].tobytes() == sp.values["w"].tobytes()
    assert out.to_dense()["w"].tobytes() == params["w"].astype(np.float32).tobytes()


@given(v=hnp.arrays(np.float32, st.integers(0, 200), elements=st.floats(-6e4, 6e4, width=32)))
def test_float16_error_is_within_half_an_ulp(v):
    _, out = _values_round_trip(v, ValueDtype.FLOAT16)
    bound = np.abs(v) * 2.0**-11 + 2.0**-25
    assert (np.abs(out.astype(np.float64) - v) <= bound).all()


@given(v=hnp.arrays(np.float32, st.integers(0, 200), elements=st.floats(-2.0**100, 2.0**100, width=32)))
def test_int8_error_is_within_half_a_step_of_the_per_tensor_scale(v):
    entry, out = _values_round_trip(v, ValueDtype.INT8)
    scale = entry[1]
    assert (np.abs(out.astype(np.float64) - v) <= scale * (0.5 + 1e-5) + 1e-30).all()


@given(v=hnp.arrays(np.float32, st.integers(0, 200), elements=st.floats(-2.0**60, 2.0**60, width=32)),
       dtype=st.sampled_from(ValueDtype))
def test_quantise_is_what_the_receiver_decodes_and_survives_a_second_send(v, dtype):
    """The sender's error feedback keeps v - quantise(v): exact only if quantise is the decode."""
    q = quantise(v, dtype)
    assert q.dtype == np.float32 and q.shape == (v.size,)
    if dtype != ValueDtype.FLOAT16 or np.all(np.abs(v) <= 65504):
        _, decoded = _values_round_trip(v, dtype)
        np.testing.assert_array_equal(q, decoded.astype(np.float32))
    _, again = _values_round_trip(q, dtype)  # the agent sends the quantised values as the task asks
    np.testing.assert_array_equal(again.astype(np.float32), q)  # bit for bit: both sides hold the same


def test_float16_quantise_saturates_where_sending_would_refuse():
    np.testing.assert_array_equal(quantise(np.array([1e6, -1e6, 1.0], np.float32), ValueDtype.FLOAT16),
                                  np.array([65504, -65504, 1.0], np.float32))


def test_lossy_dtypes_refuse_values_they_cannot_represent():
    with pytest.raises(ValueError, match="overflow float16"):
        values_to_wire(np.array([1e6], np.float32), ValueDtype.FLOAT16, TailWriter())
    with pytest.raises(ValueError, match="finite"):
        values_to_wire(np.array([np.inf], np.float32), ValueDtype.INT8, TailWriter())


def test_values_count_is_checked_against_the_mask(rng):
    layout = ModelLayout((TensorSpec("w", (10, 10), True),))
    masks = {"w": rng.random((10, 10)) < 0.5}
    other = {"w": ~masks["w"]}
    sp = SparseParams.from_dense(layout, {"w": np.where(masks["w"], 1.0, 0.0).astype(np.float32)}, masks)
    data = encode_values(sp)
    if masks["w"].sum() != other["w"].sum():
        with pytest.raises(DecodeError, match="expected"):
            decode_values(data, layout, other)
    with pytest.raises(DecodeError, match="different model layout"):
        decode_values(data, ModelLayout((TensorSpec("v", (10, 10), True),)), {"v": masks["w"]})


def test_from_dense_refuses_values_outside_the_mask_and_wrong_shapes(rng):
    layout = ModelLayout((TensorSpec("w", (4, 4), True),))
    masks = {"w": np.eye(4, dtype=bool)}
    with pytest.raises(ValueError, match="outside the mask"):
        SparseParams.from_dense(layout, {"w": np.ones((4, 4), np.float32)}, masks)
    with pytest.raises(ValueError, match="shape"):
        SparseParams.from_dense(layout, {"w": np.ones((4, 5), np.float32)}, {"w": np.ones((4, 5), bool)})


def test_standalone_masks_round_trip_and_check_the_layout(rng):
    layout = ModelLayout((TensorSpec("a", (30, 30), True), TensorSpec("b", (5,), False), TensorSpec("c", (7,), True)))
    masks = {"a": rng.random((30, 30)) < 0.1, "c": np.ones(7, bool)}
    out = decode_masks(encode_masks(layout, masks), layout)
    for k in masks:
        np.testing.assert_array_equal(out[k], masks[k])
        assert not out[k].flags.writeable


def test_mask_store_is_bounded_and_says_which_versions_it_holds(rng):
    store = MaskStore(capacity=2)
    for v in range(3):
        store.put(v, {"w": np.ones(3, bool)})
    assert 0 not in store and store.latest == 2
    with pytest.raises(UnknownMask, match=r"have \[1, 2\]"):
        store.require(0)


def test_values_beyond_or_short_of_the_tail_are_decode_errors():
    layout = ModelLayout((TensorSpec("b", (4,), False),))
    sp = SparseParams(layout, {}, {"b": np.arange(4, dtype=np.float32)})
    data = encode_values(sp)
    assert decode_values(data, layout, {}).values["b"].tolist() == [0, 1, 2, 3]
    for bad in (data[:-1], data + b"\0", b"\xff\xff\xff\xff" + data[4:], b"\0\0"):
        with pytest.raises(DecodeError):
            decode_values(bad, layout, {})
