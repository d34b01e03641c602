"""benchmarks.flops's latency model of the persistent forward (`--seq-trips`) against hand counts at
the `paper` layer (K=6, H=100, D=64 folded, nk=64, ck=cv=128, GH=400; 256 threads, tile 1), so a
change to the model's arithmetic shows here and not only in benchmarks/README.md's table."""

from benchmarks.configs import CONFIGS
from benchmarks.flops import SEQ_VERSIONS, report_seq_trips, seq_fwd_trips

PAPER = CONFIGS["paper"]


def test_measured_code_count():
    # Plain loops, 2 rows per trip: gates 2400 items -> 10 rounds x (64/2 + 100/2) = 820;
    # Q|K|V 2304 items -> 9 x 50 = 450; output 600 items -> 3 x 64 = 192; queries per sample:
    # 384 items -> 2 x ceil(100/16) = 14.
    t = seq_fwd_trips(PAPER, S=1, **SEQ_VERSIONS[0][1])
    assert t == {"queries": 14, "gates": 820, "Q|K|V": 450, "output": 192}


def test_column_groups_count():
    # 4 columns, 16 rows: gates 6*100 items -> 3 x (4 + 7) = 33; Q|K|V 6*96 -> 3 x 7 = 21;
    # output 6*25 -> 1 x 8 = 8; queries 6*16 -> 1 x 7 = 7.
    t = seq_fwd_trips(PAPER, S=1, **SEQ_VERSIONS[2][1])
    assert t == {"queries": 7, "gates": 33, "Q|K|V": 21, "output": 8}


def test_hoisted_input_term_count():
    # The gates' 64 rows of F (4 batches of 16) become one row of x F per sample: 3 x (1 + 7).
    t = seq_fwd_trips(PAPER, S=1, **SEQ_VERSIONS[3][1])
    assert t == {"queries": 7, "gates": 24, "Q|K|V": 21, "output": 8}


def test_wide_block_count():
    # 512 threads: the gates' 600 items and Q|K|V's 576 take 2 rounds instead of 3.
    t = seq_fwd_trips(PAPER, S=1, **SEQ_VERSIONS[4][1])
    assert t == {"queries": 7, "gates": 16, "Q|K|V": 14, "output": 8}


def test_report_is_calibrated_on_the_measured_row():
    table = report_seq_trips(measured_us=405.0)
    assert "| 1476 | 405 |" in table and "| 69 | 19 |" in table


def test_steps_model_paper_by_hand():
    # The stepped forward at `paper` (B=64, K=6, H=100, XW = D = 64 folded, nk=64, Q|K|V 384,
    # cv=128): query 2*6*64*100*64, gates 2*6*64*(100+64)*400, Q|K|V 2*6*64*100*384, output
    # 2*6*64*128*100; weights (100*64 + 164*400 + 100*384 + 128*100) * 6 * 2 bytes.
    from benchmarks.flops import report_steps, steps_model
    m = steps_model(PAPER)
    assert m["flops"] == {"query": 4_915_200, "gates": 50_380_800, "Q|K|V": 29_491_200,
                          "output": 9_830_400}
    assert m["weight_bytes"] == 1_478_400
    assert m["launches"] == 8 and steps_model(PAPER, lstm=False)["launches"] == 9
    assert "`large`" in report_steps()


def test_step_flops_column():
    """The report's `step TFLOP/s` numerator: nn.LSTM(64, 600)'s recurrent gates and pointwise
    work per step of the batch; the RIM's active-only step terms; none for a BRIM stack."""
    from benchmarks.flops import rim_terms, step_flops
    assert step_flops(PAPER, "lstm") == 64 * (2 * 600 * 2400 + 16 * 600)
    t = rim_terms(PAPER)
    want = 64 * sum(v[1] for k, v in t.items() if not k.startswith("_") and v[2] == "step")
    assert step_flops(PAPER, "cuda_steps") == want == step_flops(PAPER, "torch")
    assert step_flops(PAPER, "brim2") is None
