//! Which crash states to build when pending items (cache lines, disk sectors) may each be in
//! any of several states: every combination within a budget, else the targeted extremes plus
//! samples. Shared by the two crash models: the Px86 simulator ([`crate::sim`]) and the file
//! model of FAMS ([`crate::fams::SimStorage`]).

/// The choices to try when each of several pending sequences may independently keep any prefix
/// of `0..=maxima[i]` of its entries: see [`state_choices`].
pub(crate) fn prefix_choices(
    maxima: &[u32],
    limit: u64,
    samples: usize,
    rng: &mut fastrand::Rng,
) -> (Vec<Vec<u32>>, bool) {
    let wide: Vec<u64> = maxima.iter().map(|&m| u64::from(m)).collect();
    let (choices, sampled) = state_choices(&wide, limit, samples, rng);
    let narrow = choices.into_iter().map(|c| c.into_iter().map(|k| k as u32).collect()).collect();
    (narrow, sampled)
}

/// The choices to try when each of several items may independently be in any state of
/// `0..=maxima[i]` (0: nothing kept, the maximum: everything kept): every combination when
/// there are at most `limit`, else (then the flag is true) keep-none, keep-all, each item alone
/// kept whole, each item alone lost with all the others kept — the images that catch one line
/// persisting without another, which uniform draws almost never produce when lines hold many
/// stores; for more than `max(samples, 64)` items, `samples` of them drawn — and `samples`
/// drawn from `rng`.
pub(crate) fn state_choices(
    maxima: &[u64],
    limit: u64,
    samples: usize,
    rng: &mut fastrand::Rng,
) -> (Vec<Vec<u64>>, bool) {
    let total = maxima.iter().try_fold(1u64, |acc, &m| acc.checked_mul(m.checked_add(1)?));
    match total {
        Some(total) if total <= limit => {
            let all = (0..total)
                .map(|mut index| {
                    maxima
                        .iter()
                        .map(|&m| {
                            let radix = m + 1;
                            let k = index % radix;
                            index /= radix;
                            k
                        })
                        .collect()
                })
                .collect();
            (all, false)
        }
        _ => {
            let mut some = vec![vec![0; maxima.len()], maxima.to_vec()];
            // Each line alone kept / alone lost: all of them for up to `samples` lines, else
            // `samples` of them (a crash point with thousands of dirty lines is a bulk copy,
            // whose lines matter together, not one by one).
            let n = maxima.len();
            let lines: Vec<usize> = if n <= samples.max(64) {
                (0..n).collect()
            } else {
                (0..samples).map(|_| rng.usize(..n)).collect()
            };
            for i in lines {
                let mut alone = vec![0; n];
                alone[i] = maxima[i];
                some.push(alone);
                let mut without = maxima.to_vec();
                without[i] = 0;
                some.push(without);
            }
            some.extend((0..samples).map(|_| maxima.iter().map(|&m| rng.u64(..=m)).collect()));
            (some, true)
        }
    }
}
