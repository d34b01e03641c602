"""The masked cell ops (csrc/masked_cell*, rims_fast/masked_cell.py) against their references.

``TestMaskedCellCPU`` runs everywhere the extension is built; ``TestMaskedCellCUDA`` runs the same
tests on a GPU (marker ``gpu``).
"""

import pytest
import torch

from helpers import assert_close
from rims_fast import masked_cell as mc

pytestmark = pytest.mark.skipif(not mc.HAVE_C, reason=f"rims_fast._C not built: {mc.C_IMPORT_ERROR}")

OPS = {"lstm": (mc.masked_lstm_cell, mc.masked_lstm_cell_ref, 4),
       "gru": (mc.masked_gru_cell, mc.masked_gru_cell_ref, 3)}
# (B, K, H): a single element, H not a power of two (odd, and 33 > one warp), larger rows.
SHAPES = [(1, 1, 1), (2, 3, 5), (3, 4, 7), (2, 5, 33), (4, 6, 64)]
MASKS = ["mixed", "all", "none"]


def make_inputs(cell, shape, mask_mode, dtype, device, seed=0, requires_grad=False):
    """Float inputs of the op (gates, h, c / gi, gh, h) then the mask; drawn in float64 on CPU
    so every dtype and device sees the same values."""
    B, K, H = shape
    g = torch.Generator().manual_seed(seed)
    G = OPS[cell][2]

    def draw(*s):
        t = (2 * torch.randn(*s, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    if mask_mode == "mixed":
        mask = torch.rand(B, K, generator=g) < 0.5
        mask.view(-1)[0] = True
        if mask.numel() > 1:
            mask.view(-1)[1] = False
    else:
        mask = torch.full((B, K), mask_mode == "all")
    floats = [draw(B, K, G * H), draw(B, K, H), draw(B, K, H)] if cell == "lstm" else \
             [draw(B, K, G * H), draw(B, K, G * H), draw(B, K, H)]
    return floats, mask.to(device)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class TestMaskedCellCPU:
    device = "cpu"

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("mask_mode", MASKS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_forward_matches_ref(self, cell, shape, mask_mode, dtype):
        op, ref, _ = OPS[cell]
        floats, mask = make_inputs(cell, shape, mask_mode, dtype, self.device)
        got, want = as_tuple(op(*floats, mask)), as_tuple(ref(*floats, mask))
        states = floats[1:] if cell == "lstm" else floats[2:]  # (h, c) / (h,)
        for name, g, w, prev in zip(["h_new", "c_new"], got, want, states):
            assert g.dtype == dtype and g.device == prev.device and g.is_contiguous()
            assert_close(f"{cell} {name}", g, w, dtype)
            # Inactive rows are copies, bit for bit.
            assert torch.equal(g[~mask], prev[~mask]), f"{name}: inactive rows are not copies"

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("mask_mode", MASKS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_backward_matches_ref(self, cell, shape, mask_mode, dtype):
        op, ref, _ = OPS[cell]
        floats, mask = make_inputs(cell, shape, mask_mode, dtype, self.device, requires_grad=True)
        got, want = as_tuple(op(*floats, mask)), as_tuple(ref(*floats, mask))
        # Upstream gradients that are not contiguous (transposed storage), as autograd often
        # hands them over.
        B, K, H = shape
        g = torch.Generator().manual_seed(7)
        ups = [torch.randn(H, K, B, generator=g, dtype=torch.float64)
               .to(self.device, dtype).permute(2, 1, 0) for _ in got]
        grads = torch.autograd.grad(got, floats, ups)
        grads_ref = torch.autograd.grad(want, floats, ups)
        names = ["gates", "h", "c"] if cell == "lstm" else ["gi", "gh", "h"]
        for name, a, e in zip(names, grads, grads_ref):
            assert_close(f"{cell} grad_{name}", a, e, dtype, "grad_in")
        inactive = ~mask
        for name, a in zip(names, grads):
            if name in ("gates", "gi", "gh"):
                assert torch.all(a[inactive] == 0), f"grad_{name} of inactive rows is not 0"
        # Inactive rows pass their upstream gradient through exactly (copy): h, and c for LSTM.
        state_grads = grads[1:] if cell == "lstm" else grads[2:]
        for a, u in zip(state_grads, ups):
            assert torch.equal(a[inactive], u[inactive])

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_gradcheck(self, cell):
        op = OPS[cell][0]
        floats, mask = make_inputs(cell, (2, 3, 5), "mixed", torch.float64, self.device,
                                   requires_grad=True)
        assert torch.autograd.gradcheck(lambda *x: op(*x, mask), floats)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_opcheck(self, cell, dtype):
        floats, mask = make_inputs(cell, (2, 3, 5), "mixed", dtype, self.device, requires_grad=True)
        ops = torch.ops.rims_fast
        fwd = ops.masked_lstm_cell_fwd if cell == "lstm" else ops.masked_gru_cell_fwd
        torch.library.opcheck(fwd.default, (*floats, mask))
        plain = [t.detach() for t in floats]
        grad = torch.randn_like(plain[-1])
        if cell == "lstm":
            gates, _h, c = plain
            args = (grad, torch.randn_like(c), gates, c, mask)
            torch.library.opcheck(ops.masked_lstm_cell_bwd.default, args)
        else:
            torch.library.opcheck(ops.masked_gru_cell_bwd.default, (grad, *plain, mask))

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_noncontiguous_inputs(self, cell):
        op = OPS[cell][0]
        floats, mask = make_inputs(cell, (3, 4, 7), "mixed", torch.float32, self.device)
        # Same values in transposed storage, and a strided mask.
        strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in floats]
        mask_s = mask.t().contiguous().t()
        assert not strided[0].is_contiguous() and not mask_s.is_contiguous()
        for a, b in zip(as_tuple(op(*strided, mask_s)), as_tuple(op(*floats, mask))):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_float32_close_to_float64(self, cell):
        op, ref, _ = OPS[cell]
        f32, mask = make_inputs(cell, (4, 6, 64), "mixed", torch.float32, self.device)
        f64, _ = make_inputs(cell, (4, 6, 64), "mixed", torch.float64, self.device)
        for a, e in zip(as_tuple(op(*f32, mask)), as_tuple(ref(*f64, mask))):
            assert_close(f"{cell} f32 vs f64", a, e, torch.float32)

    def test_matches_nn_cells(self):
        """Gate order and formulas are nn.LSTMCell's / nn.GRUCell's (all mechanisms active)."""
        torch.manual_seed(0)
        B, D, H = 5, 4, 6
        x = torch.randn(B, D, dtype=torch.float64, device=self.device)
        h, c = torch.randn(2, B, H, dtype=torch.float64, device=self.device)
        mask = torch.ones(B, 1, dtype=torch.bool, device=self.device)
        lstm = torch.nn.LSTMCell(D, H, dtype=torch.float64, device=self.device)
        gates = x @ lstm.weight_ih.T + lstm.bias_ih + h @ lstm.weight_hh.T + lstm.bias_hh
        h_new, c_new = mc.masked_lstm_cell(gates[:, None], h[:, None], c[:, None], mask)
        h_want, c_want = lstm(x, (h, c))
        assert_close("LSTMCell h", h_new[:, 0], h_want, torch.float64)
        assert_close("LSTMCell c", c_new[:, 0], c_want, torch.float64)
        gru = torch.nn.GRUCell(D, H, dtype=torch.float64, device=self.device)
        gi = x @ gru.weight_ih.T + gru.bias_ih
        gh = h @ gru.weight_hh.T + gru.bias_hh
        got = mc.masked_gru_cell(gi[:, None], gh[:, None], h[:, None], mask)
        assert_close("GRUCell h", got[:, 0], gru(x, h), torch.float64)

    def test_bad_inputs_raise(self):
        (gates, h, c), mask = make_inputs("lstm", (2, 3, 5), "mixed", torch.float32, self.device)
        (gi, gh, hg), _ = make_inputs("gru", (2, 3, 5), "mixed", torch.float32, self.device)
        cases = [
            ((gates.half(), h.half(), c.half(), mask), "float32 or float64"),
            ((gates, h.double(), c, mask), "h must have dtype"),
            ((gates, h, c, mask.float()), "mask must have dtype bool"),
            ((gates[..., :-1], h, c, mask), r"4\*H"),
            ((gates[0], h, c, mask), "dim 3"),
            ((gates, h[:, :2], c, mask), "h must have shape"),
            ((gates, h, c[..., :4], mask), "c must have shape"),
            ((gates, h, c, mask[:1]), "mask must have shape"),
        ]
        for args, msg in cases:
            with pytest.raises(RuntimeError, match=msg):
                mc.masked_lstm_cell(*args)
        with pytest.raises(RuntimeError, match="gh must have shape"):
            mc.masked_gru_cell(gi, gh[..., :-3], hg, mask)
        with pytest.raises(RuntimeError, match="h must have shape"):
            mc.masked_gru_cell(gi, gh, hg[..., :4], mask)
        if self.device == "cuda":
            with pytest.raises(RuntimeError, match="is on"):
                mc.masked_lstm_cell(gates, h.cpu(), c, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestMaskedCellCUDA(TestMaskedCellCPU):
    device = "cuda"
