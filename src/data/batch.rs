//! Truncation, packing and batches: from examples to what `Model::forward_backward`
//! takes (ids, positions, segments, next-token targets).

use super::{Example, Parsed, Record, Tokenizer};
use crate::error::{Error, Result};

/// One training sequence: one example, or several packed.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Whether each position's token is trained (is a target of the previous one).
    pub trained: Vec<bool>,
    /// Positions restart at each packed example.
    pub pos: Vec<u32>,
    /// Which packed example each token belongs to; attention stays within it.
    pub seg: Vec<u32>,
}

impl Sequence {
    /// One unpacked example: positions from 0, one segment.
    pub fn from_example(e: &Example) -> Sequence {
        Sequence { ids: e.ids.clone(), trained: e.trained.clone(), pos: (0..e.ids.len() as u32).collect(), seg: vec![0; e.ids.len()] }
    }

    /// Next-token targets: the token at t + 1 when it is trained and in the same
    /// example, else −100.
    pub fn targets(&self) -> Vec<i32> {
        (0..self.ids.len())
            .map(|t| {
                if t + 1 < self.ids.len() && self.trained[t + 1] && self.seg[t + 1] == self.seg[t] {
                    self.ids[t + 1] as i32
                } else {
                    -100
                }
            })
            .collect()
    }

    pub fn trained_targets(&self) -> usize {
        self.targets().iter().filter(|&&t| t >= 0).count()
    }
}

/// Keep the first `max_len` tokens.
pub fn truncate(e: &mut Example, max_len: usize) {
    if e.ids.len() > max_len {
        e.truncated = e.ids.len() - max_len;
        e.ids.truncate(max_len);
        e.trained.truncate(max_len);
        e.offsets.truncate(max_len);
    }
}

/// Greedy packing in order: examples are appended to the current sequence while they
/// fit in `max_len`, then a new one starts.
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Sequence> {
    let mut out: Vec<Sequence> = Vec::new();
    let mut cur: Option<Sequence> = None;
    for e in examples {
        let n = e.ids.len();
        if let Some(c) = &cur {
            if c.ids.len() + n > max_len {
                out.push(cur.take().unwrap());
            }
        }
        let c = cur.get_or_insert_with(|| Sequence { ids: vec![], trained: vec![], pos: vec![], seg: vec![] });
        let seg = c.seg.last().map_or(0, |s| s + 1);
        c.ids.extend(&e.ids);
        c.trained.extend(&e.trained);
        c.pos.extend(0..n as u32);
        c.seg.extend(std::iter::repeat_n(seg, n));
    }
    out.extend(cur);
    out
}

/// Why records were left out, and how many.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    /// Nothing left to train after truncation (or nothing trained at all).
    pub no_trained_tokens: usize,
}

/// The examples of a data file, ready to batch.
pub struct Dataset {
    /// Records read, before any were skipped.
    pub records: usize,
    pub examples: Vec<Example>,
    pub sequences: Vec<Sequence>,
    pub skipped: Skipped,
    /// Preference pairs (DPO): examples and sequences alternate chosen, rejected.
    pub pairs: bool,
}

impl Dataset {
    /// Training items: pairs for preference data, else sequences.
    pub fn items(&self) -> usize {
        if self.pairs { self.sequences.len() / 2 } else { self.sequences.len() }
    }

    /// The longest row a batch of this data holds: a sequence, or a pair's row
    /// (`PairBatch`, its prompt once); 1 when empty.
    pub fn longest_row(&self) -> usize {
        let longest = if self.pairs { self.sequences.chunks(2).map(|p| PairBatch::row_len(&p[0], &p[1])).max() } else { self.sequences.iter().map(|s| s.ids.len()).max() };
        longest.unwrap_or(1).max(1)
    }
}

/// Tokenize, mask and truncate every record; drop those with nothing to train; pack
/// when asked. Preference records (DPO) make a dataset of pairs (`prepare_pairs`).
pub fn prepare(tok: &Tokenizer, records: &[Parsed], max_seq_len: usize, pack_sequences: bool, train_on_prompt: bool) -> Result<Dataset> {
    if records.first().is_some_and(|r| matches!(r.record, Record::Preference(_))) {
        if pack_sequences || train_on_prompt {
            let flag = if pack_sequences { "--pack" } else { "--train-on-prompt" };
            return Err(Error::Data(format!("{}: preference pairs are trained one sequence each, on their completions: {flag} does not apply", records[0].place)));
        }
        return prepare_pairs(tok, records, max_seq_len);
    }
    let mut examples = Vec::with_capacity(records.len());
    let mut skipped = Skipped::default();
    for r in records {
        let mut e = tok.example(r, train_on_prompt)?;
        truncate(&mut e, max_seq_len);
        if Sequence::from_example(&e).trained_targets() == 0 {
            skipped.no_trained_tokens += 1;
            continue;
        }
        examples.push(e);
    }
    let sequences = if pack_sequences { pack(&examples, max_seq_len) } else { examples.iter().map(Sequence::from_example).collect() };
    Ok(Dataset { records: records.len(), examples, sequences, skipped, pairs: false })
}

/// Tokenize every preference pair (`Tokenizer::pair`), keep the first `max_seq_len`
/// tokens of each side (TRL's `keep_start`), and drop pairs where a side has no
/// completion token left. Examples and sequences alternate chosen, rejected.
pub fn prepare_pairs(tok: &Tokenizer, records: &[Parsed], max_seq_len: usize) -> Result<Dataset> {
    let mut examples = Vec::with_capacity(2 * records.len());
    let mut skipped = Skipped::default();
    for r in records {
        let (mut c, mut j) = tok.pair(r)?;
        truncate(&mut c, max_seq_len);
        truncate(&mut j, max_seq_len);
        if [&c, &j].iter().any(|e| Sequence::from_example(e).trained_targets() == 0) {
            skipped.no_trained_tokens += 1;
            continue;
        }
        examples.extend([c, j]);
    }
    let sequences = examples.iter().map(Sequence::from_example).collect();
    Ok(Dataset { records: records.len(), examples, sequences, skipped, pairs: true })
}

/// The top two bits of a segment id say which side of a DPO pair a token is on: 0 the
/// prompt both sides share, `CHOSEN` or `REJECTED` one side's (`PairBatch`). Padding
/// (`u32::MAX`) is a side of its own.
pub const BRANCH_SHIFT: u32 = 30;
pub const CHOSEN: u32 = 1 << BRANCH_SHIFT;
pub const REJECTED: u32 = 2 << BRANCH_SHIFT;

/// Whether a query of segment `query` sees a key of segment `key` (causality aside):
/// the same example, and the key on the shared prompt or the query's own side.
/// kernels/attention.wgsl's `sees`.
pub fn sees(query: u32, key: u32) -> bool {
    let side = key >> BRANCH_SHIFT;
    example(query) == example(key) && (side == 0 || side == query >> BRANCH_SHIFT)
}

/// The example of a segment id: its low 30 bits, the side bits cleared.
/// kernels/attention.wgsl's `example`.
pub fn example(seg: u32) -> u32 {
    seg & (CHOSEN - 1)
}

/// A batch of preference pairs, one row each, their shared prompt computed once (as
/// prefix sharing for DPO does): the chosen sequence, then the rejected one from the
/// last token the two share, at its own positions, seeing the shared tokens and
/// itself (`sees`). That token is repeated so that each side has the row that
/// predicts its first token. Each sequence's log-probability and gradient are what
/// they are unshared; the row of each token goes to its sequence through `row_seq`
/// (`[N]`: pair i's chosen rows to i, its rejected rows to P + i).
#[derive(Clone, Debug, PartialEq)]
pub struct PairBatch {
    pub batch: Batch,
    pub row_seq: Vec<u32>,
    /// Each sequence's completion tokens `[2P]`: the chosen sides, then the rejected.
    pub counts: Vec<f32>,
}

impl PairBatch {
    pub fn new(pairs: &[(&Sequence, &Sequence)], pad_id: u32) -> PairBatch {
        let np = pairs.len() as u32;
        // Where each rejected side starts: at the last token the two sides share.
        let starts: Vec<usize> = pairs.iter().map(|(c, r)| PairBatch::rejected_from(c, r)).collect();
        let t = pairs.iter().zip(&starts).map(|((c, r), k)| c.ids.len() + r.ids.len() - k).max().unwrap_or(1).max(1);
        let mut b = Batch { b: pairs.len(), t, ids: vec![], pos: vec![], seg: vec![], targets: vec![] };
        let mut row_seq = Vec::with_capacity(pairs.len() * t);
        for (i, ((c, r), &k)) in pairs.iter().zip(&starts).enumerate() {
            let len = c.ids.len() + r.ids.len() - k;
            b.ids.extend(c.ids.iter().chain(&r.ids[k..]).copied().chain(std::iter::repeat_n(pad_id, t - len)));
            b.pos.extend(c.pos.iter().chain(&r.pos[k..]).copied().chain(0..(t - len) as u32));
            b.seg.extend((0..c.ids.len()).map(|j| if j < k { 0 } else { CHOSEN }));
            b.seg.extend(std::iter::repeat_n(REJECTED, r.ids.len() - k).chain(std::iter::repeat_n(u32::MAX, t - len)));
            b.targets.extend(c.targets().into_iter().chain(r.targets().into_iter().skip(k)).chain(std::iter::repeat_n(-100, t - len)));
            row_seq.extend(std::iter::repeat_n(i as u32, c.ids.len()).chain(std::iter::repeat_n(np + i as u32, t - c.ids.len())));
        }
        let counts = pairs.iter().map(|p| p.0).chain(pairs.iter().map(|p| p.1)).map(|s| s.trained_targets() as f32).collect();
        PairBatch { batch: b, row_seq, counts }
    }

    /// Where a pair's rejected side starts in its own sequence: at the last of the
    /// tokens both sides start with untrained (the prompt), or at 0.
    fn rejected_from(c: &Sequence, r: &Sequence) -> usize {
        let shared = (0..c.ids.len().min(r.ids.len())).take_while(|&j| c.ids[j] == r.ids[j] && !c.trained[j] && !r.trained[j]).count();
        shared.saturating_sub(1)
    }

    /// The tokens of a pair's row.
    pub fn row_len(c: &Sequence, r: &Sequence) -> usize {
        c.ids.len() + r.ids.len() - PairBatch::rejected_from(c, r)
    }
}

/// A padded batch: `[b, t]` row-major, right-padded with `pad_id` (padding is its own
/// segment and never a target).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub b: usize,
    pub t: usize,
    pub ids: Vec<u32>,
    pub pos: Vec<u32>,
    pub seg: Vec<u32>,
    pub targets: Vec<i32>,
}

impl Batch {
    pub fn new(seqs: &[&Sequence], pad_id: u32) -> Batch {
        let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(1);
        let b = seqs.len();
        let mut batch = Batch { b, t, ids: vec![], pos: vec![], seg: vec![], targets: vec![] };
        for s in seqs {
            let pad = t - s.ids.len();
            batch.ids.extend(s.ids.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            batch.pos.extend(s.pos.iter().copied().chain(0..pad as u32));
            batch.seg.extend(s.seg.iter().copied().chain(std::iter::repeat_n(u32::MAX, pad)));
            batch.targets.extend(s.targets().into_iter().chain(std::iter::repeat_n(-100, pad)));
        }
        batch
    }

    /// Tokens that are not padding.
    pub fn real_tokens(&self) -> usize {
        self.seg.iter().filter(|&&s| s != u32::MAX).count()
    }

    pub fn trained_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}
