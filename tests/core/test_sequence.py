"""Tests for Sequence and SequenceStatus."""
from shardserve.core.sequence import Sequence, SequenceStatus
from shardserve.sampling_params import SamplingParams


def make(prompt=(1, 2, 3)) -> Sequence:
    return Sequence(seq_id="r-0", request_id="r", index=0, prompt_token_ids=list(prompt),
                    sampling_params=SamplingParams(), seed=7, arrival_time=1.0)


def test_initial_state():
    seq = make()
    assert seq.status == SequenceStatus.WAITING and not seq.is_finished
    assert seq.num_tokens == seq.num_prompt_tokens == 3 and seq.num_output_tokens == 0
    assert seq.last_token_id == 3 and seq.all_token_ids == [1, 2, 3]
    assert seq.needs_full_send and not seq.in_flight and seq.block_ids == []
    assert seq.num_computed_tokens == seq.num_tokens_sent == seq.num_preemptions == 0
    assert seq.finish_reason is None and seq.stop_reason is None


def test_append_and_views():
    seq = make()
    seq.append_token(9)
    seq.append_token(10)
    assert seq.output_token_ids == [9, 10] and seq.all_token_ids == [1, 2, 3, 9, 10]
    assert seq.num_tokens == 5 and seq.num_output_tokens == 2 and seq.last_token_id == 10
    assert seq.prompt_token_ids == [1, 2, 3]


def test_prompt_is_copied():
    prompt = [1, 2]
    seq = make(prompt)
    prompt.append(3)
    assert seq.prompt_token_ids == [1, 2]


def test_finish_and_status_flags():
    finished = {s for s in SequenceStatus if s.is_finished}
    assert finished == {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                        SequenceStatus.FINISHED_ABORTED, SequenceStatus.FINISHED_ERROR}
    seq = make()
    seq.finish(SequenceStatus.FINISHED_STOPPED, "stop", stop_reason=42)
    assert seq.is_finished and seq.finish_reason == "stop" and seq.stop_reason == 42


def test_in_flight():
    seq = make()
    seq.in_flight_step = 0
    assert seq.in_flight
    seq.in_flight_step = None
    assert not seq.in_flight


def test_token_ids_slice_matches_all_token_ids():
    seq = make([1, 2, 3])
    for t in (7, 8, 9):
        seq.append_token(t)
    for a in range(7):
        for b in range(a, 8):
            assert seq.token_ids_slice(a, b) == seq.all_token_ids[a:b]
        assert seq.token_ids_slice(a) == seq.all_token_ids[a:]


def test_first_finish_wins_and_reason_defaults():
    seq = make()
    seq.finish(SequenceStatus.FINISHED_LENGTH)
    assert seq.finish_reason == "length"
    seq.finish(SequenceStatus.FINISHED_ABORTED, "abort")
    assert seq.status == SequenceStatus.FINISHED_LENGTH and seq.finish_reason == "length"
