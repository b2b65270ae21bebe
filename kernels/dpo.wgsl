// Direct preference optimization (DPO) over P pairs, from per-sequence sums of
// completion-token log-probabilities, as TRL's DPOTrainer computes it.
//   logps   [2P]  the policy's: pair i's chosen at i, its rejected at P + i (one batch)
//   ref     [2P]  the reference model's, same layout
//   counts  [2P]  completion tokens of each sequence (IPO averages per token)
//   stats   [8]   += scale · Σ over pairs of: loss, rewards/chosen, rewards/rejected,
//                 rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, 0
//                 (scale = 1 / pairs in the step: means, accumulated over micro-batches)
//   coef    [2P]  −d(loss · scale)/d(logps): each sequence's factor in the
//                 cross-entropy backward (cross_entropy_backward_scaled)
//   sft           RPO's NLL term on the chosen completions (TRL's loss_type "sft",
//                 older TRL's rpo_alpha α): the loss += sft · Σ −πc, sft = α / the
//                 step's chosen completion tokens (their mean NLL, weighted α)
// With h = (πc − rc) − (πr − rr) and σ the logistic function, the losses (TRL's names):
//   sigmoid  −(1−ε) log σ(βh) − ε log σ(−βh)      (ε > 0: conservative DPO, cDPO)
//   ipo      (hc/nc − hr/nr − 1/(2β))², hc = πc − rc, nc its completion tokens
//   robust   (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)

struct Params {
    pairs: u32, loss: u32, _p0: u32, _p1: u32,
    beta: f32, eps: f32, scale: f32, sft: f32,
}

const SIGMOID: u32 = 0u;
const IPO: u32 = 1u;
const ROBUST: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logps: array<f32>;
@group(0) @binding(2) var<storage, read> ref_logps: array<f32>;
@group(0) @binding(3) var<storage, read> counts: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> coef: array<f32>;

fn log_sigmoid(x: f32) -> f32 { return min(x, 0.0) - log(1.0 + exp(-abs(x))); }
fn sigmoid(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }

// Pair i's loss and d(loss)/d(πc), d(loss)/d(πr).
fn pair(i: u32) -> vec3<f32> {
    let hc = logps[i] - ref_logps[i];
    let hr = logps[p.pairs + i] - ref_logps[p.pairs + i];
    let b = p.beta; let e = p.eps;
    if (p.loss == IPO) {
        let nc = max(counts[i], 1.0); let nr = max(counts[p.pairs + i], 1.0);
        let d = hc / nc - hr / nr - 1.0 / (2.0 * b);
        return vec3<f32>(d * d, 2.0 * d / nc, -2.0 * d / nr);
    }
    let x = b * (hc - hr);
    var l: f32; var dh: f32;
    if (p.loss == ROBUST) {
        l = (-(1.0 - e) * log_sigmoid(x) + e * log_sigmoid(-x)) / (1.0 - 2.0 * e);
        dh = b * (-(1.0 - e) * sigmoid(-x) - e * sigmoid(x)) / (1.0 - 2.0 * e);
    } else {
        l = -(1.0 - e) * log_sigmoid(x) - e * log_sigmoid(-x);
        dh = b * (-(1.0 - e) * sigmoid(-x) + e * sigmoid(x));
    }
    return vec3<f32>(l, dh, -dh);
}

// Grid: (1, 1, 1): one invocation walks the pairs (a micro-batch holds few).
@compute @workgroup_size(1, 1, 1)
fn dpo_forward() {
    var s = array<f32, 7>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    var nll = 0.0;
    for (var i = 0u; i < p.pairs; i++) {
        nll -= logps[i];
        let rc = p.beta * (logps[i] - ref_logps[i]);
        let rr = p.beta * (logps[p.pairs + i] - ref_logps[p.pairs + i]);
        s[0] += pair(i).x;
        s[1] += rc;
        s[2] += rr;
        s[3] += select(0.0, 1.0, rc > rr);
        s[4] += rc - rr;
        s[5] += logps[i];
        s[6] += logps[p.pairs + i];
    }
    for (var k = 0u; k < 7u; k++) { stats[k] += s[k] * p.scale; }
    stats[0] += nll * p.sft;
}

// Grid: (ceil(P/64), 1, 1).
@compute @workgroup_size(64, 1, 1)
fn dpo_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.pairs) { return; }
    let g = pair(i);
    coef[i] = -g.y * p.scale + p.sft;
    coef[p.pairs + i] = -g.z * p.scale;
}
