use super::*;
use proptest::prelude::*;

fn search(values: &[u64], target: u64) -> (u64, u64) {
    // Sequences start at 1: values[i] is the event at sequence i + 1.
    let mut b = Bisect::new(1, values.len() as u64);
    let mut probes = 0;
    while let Some(seq) = b.probe() {
        probes += 1;
        b.record(seq, values[(seq - 1) as usize] >= target);
    }
    (b.result(), probes)
}

#[test]
fn finds_the_first_at_or_after() {
    let v = [10, 20, 20, 30, 40];
    assert_eq!(search(&v, 5).0, 1);
    assert_eq!(search(&v, 10).0, 1);
    assert_eq!(search(&v, 15).0, 2);
    assert_eq!(search(&v, 20).0, 2);
    assert_eq!(search(&v, 40).0, 5);
    assert_eq!(search(&v, 41).0, 6, "past the end");
}

#[test]
fn filter_by_type_and_table() {
    let ev = br#"{"type":"orders.created","data":{"table":"public.orders"}}"#;
    assert!(Filter::default().matches(ev));
    let mut f = Filter::default();
    f.add_table("orders");
    assert!(f.matches(ev));
    f.types.push("orders.deleted".into());
    assert!(!f.matches(ev));
    let mut g = Filter::default();
    g.add_table("sales.orders");
    assert!(!g.matches(ev));
}

proptest! {
    #[test]
    fn bisect_matches_a_linear_scan_in_logarithmic_probes(
        mut values in proptest::collection::vec(0u64..1000, 1..300),
        target in 0u64..1100,
    ) {
        values.sort();
        let (got, probes) = search(&values, target);
        let expected = values.iter().position(|v| *v >= target).map_or(values.len() as u64 + 1, |i| i as u64 + 1);
        prop_assert_eq!(got, expected);
        let bound = 64 - (values.len() as u64).leading_zeros() as u64 + 1;
        prop_assert!(probes <= bound, "{} probes for {} values", probes, values.len());
    }
}
