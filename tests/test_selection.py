"""Selection tensors and the name-level :class:`Selector` (:mod:`hotswap_rt.selection`)."""

from __future__ import annotations

import pytest
import torch

from hotswap_rt.errors import SelectionError
from hotswap_rt.selection import Selection, Selector, row_spec


def test_write_lays_out_slots_and_per_row_weights() -> None:
    selection = Selection(max_batch_size=4, max_active=3, device=torch.device("cpu"))
    selection.write([{2: 1.0}, {0: 0.5, 2: 0.25}, {}])
    assert selection.active_slots.tolist() == [0, 2, 0]  # sorted slots, unused positions -> 0
    assert selection.row_weights.tolist() == [[0, 1, 0], [0.5, 0.25, 0], [0, 0, 0], [0, 0, 0]]
    selection.write([{1: 2.0}])  # one spec: every row
    assert selection.active_slots.tolist()[0] == 1
    assert selection.row_weights[:, 0].tolist() == [2.0] * 4
    with pytest.raises(SelectionError, match="max_active_adapters=3"):
        selection.write([{0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}])
    with pytest.raises(SelectionError, match="max_batch_size=4"):
        selection.write([{}] * 5)


def test_every_field_of_a_write_lands_in_the_one_packed_buffer() -> None:
    """Per-row selection (m = 1 of 3), in place over 3 slots: all the tensors are views of one
    buffer (a write is one copy), and each holds exactly what the rows say."""
    selection = Selection(max_batch_size=4, max_active=3, device=torch.device("cpu"), max_per_row=1,
                          in_place_slots=3)
    tensors = selection.tensors()
    assert {t.untyped_storage().data_ptr() for t in tensors.values()} == {selection.packed.data_ptr()}
    selection.write([{2: 0.5}, {}, {1: 2.0}])
    assert selection.active_slots.tolist() == [0, 1, 2]  # in place: the slots themselves
    assert selection.row_weights.tolist() == [[0, 0, 0.5], [0, 0, 0], [0, 2.0, 0], [0, 0, 0]]
    assert selection.row_slots.tolist() == [[2], [0], [1], [0]]
    assert selection.row_slot_weights.tolist() == [[0.5], [0], [2.0], [0]]
    assert selection.row_on.tolist() == (selection.row_weights != 0).tolist()
    assert selection.row_slot_on.tolist() == [[True], [False], [True], [False]]
    assert selection.row_count.item() == 3 and selection.zero.item() == 0
    selection.write([{1: 0.25}])  # uniform: every row, row_count 1
    assert selection.row_slots.tolist() == [[1]] * 4 and selection.row_slot_weights.tolist() == [[0.25]] * 4
    assert selection.row_weights[:, 1].tolist() == [0.25] * 4 and selection.row_count.item() == 1
    assert selection.row_on[:, 1].all() and not selection.row_on[:, [0, 2]].any()
    selection.write([{2: 0.5}, {}, {1: 2.0}])  # a kept image, written again whole
    assert selection.row_slots.tolist() == [[2], [0], [1], [0]] and selection.row_count.item() == 3
    selection.clear()  # every weight and flag off; the slot indices may stay
    for name in ("row_weights", "row_slot_weights", "row_on", "row_slot_on"):
        assert not tensors[name].any(), name
    assert selection.zero.item() == 0 and selection.active_slots.tolist() == [0, 1, 2]


def test_a_write_or_clear_is_seen_by_autograd_as_an_in_place_change() -> None:
    """A write (or a clear) bumps the selection tensors' version counter, so a backward through
    a forward that read the old selection fails loudly instead of computing gradients with the
    new weights."""
    selection = Selection(max_batch_size=2, max_active=2, device=torch.device("cpu"))
    selection.write([{0: 1.0}])
    versions = {name: t._version for name, t in selection.tensors().items()}
    x = torch.ones(2, 2, requires_grad=True)
    loss = (x * selection.row_weights).sum()  # saves row_weights for x's gradient
    selection.write([{1: 3.0}])
    assert all(t._version > versions[name] for name, t in selection.tensors().items())
    assert selection.row_weights[:, 0].tolist() == [3.0, 3.0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    version = selection.packed._version
    selection.clear()  # no adapter on any row: every weight and flag zero, the version bumped
    assert selection.packed._version > version
    assert not selection.row_weights.any() and not selection.row_on.any()
    assert not selection.row_slot_weights.any() and not selection.row_slot_on.any()


def test_selector_translates_names_and_skips_unchanged_writes() -> None:
    selection = Selection(4, 2, torch.device("cpu"))
    selector = Selector(selection)
    where = {"a": (3, 1.0), "b": (1, 0.5)}
    resolved: list[str] = []

    def resolve(name: str) -> tuple[int, float]:
        resolved.append(name)
        return where[name]

    selector.set([{"a": 1.0}, {"b": 2.0}, {}], per_row=True)
    selector.write(resolve)
    assert selection.active_slots.tolist() == [1, 3]
    assert selection.row_weights[:3].tolist() == [[0, 1], [1.0, 0], [0, 0]]  # b: 2.0 * 0.5
    assert selector.selected_slots() == {1, 3}
    selection.row_weights.fill_(7)  # not what the selector wrote: an unchanged write skips
    selector.write(resolve)
    assert selection.row_weights[0, 0] == 7
    selector.drop("a")
    selector.write(resolve)
    assert selector.rows == [{}, {"b": 2.0}, {}] and selector.selected_slots() == {1}
    selector.enabled = False
    selector.write(resolve)
    assert selection.row_weights.abs().sum() == 0 and selector.selected_slots() == set()


def test_check_batch_follows_the_per_row_selection() -> None:
    selector = Selector(Selection(4, 2, torch.device("cpu")))
    selector.set([{}, {}], per_row=True)
    selector.write(lambda name: (0, 1.0))
    selector.check_batch(2)
    with pytest.raises(SelectionError, match="set 2 rows but the batch has 3"):
        selector.check_batch(3)
    with pytest.raises(SelectionError, match="max_batch_size=4"):
        selector.check_batch(5)
    selector.set([{"a": 1.0}], per_row=False)
    selector.write(lambda name: (0, 1.0))
    selector.check_batch(3)  # uniform: any batch


@pytest.mark.parametrize("spec, error", [(3, "a name"), ({"a": float("nan")}, "finite"),
                                         ({"a": True}, "finite"), ({1: 1.0}, "str")])
def test_row_spec_refuses_malformed_activations(spec, error) -> None:
    with pytest.raises(SelectionError, match=error):
        row_spec(spec)
    assert row_spec("a") == {"a": 1.0} and row_spec({"a": 2}) == {"a": 2.0}
