//! Stable numbers for names: identity tags from SPIFFE IDs and service ids
//! from service names. A number depends on the name and on which other names
//! share its hash, never on the order of the file, the time or the machine:
//! flows, counters and replay output keep meaning the same thing across policy
//! updates and agent restarts.

use std::collections::HashSet;

/// FNV-1a, 32 bits: fixed (unlike std's seeded hasher), tiny and good enough
/// at spreading short strings.
pub(super) fn fnv1a(name: &str) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    name.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    })
}

/// A number for each of the distinct `names`, in their order, none of them in
/// `reserved`.
pub(super) fn assign<'a>(names: impl IntoIterator<Item = &'a str>, reserved: &[u32]) -> Vec<u32> {
    let hashed: Vec<(u32, &str)> = names.into_iter().map(|name| (fnv1a(name), name)).collect();
    assign_hashed(&hashed, reserved)
}

/// Each name gets its hash, unless the hash is reserved or another name with
/// the same hash sorts before it; those names, in (hash, name) order, take the
/// next free number above their hash. So a name whose hash is shared by no
/// other keeps its number whatever else the policy holds.
fn assign_hashed(hashed: &[(u32, &str)], reserved: &[u32]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..hashed.len()).collect();
    order.sort_unstable_by_key(|&i| hashed[i]);
    let mut taken: HashSet<u32> = reserved.iter().copied().collect();
    let mut numbers = vec![0; hashed.len()];
    let mut displaced = Vec::new();
    for i in order {
        let hash = hashed[i].0;
        if taken.insert(hash) {
            numbers[i] = hash;
        } else {
            displaced.push(i);
        }
    }
    // Probing only after every undisplaced name has its hash, so a probe
    // never takes the number that is some other name's own hash.
    for i in displaced {
        let mut number = hashed[i].0;
        loop {
            number = number.wrapping_add(1);
            if taken.insert(number) {
                break;
            }
        }
        numbers[i] = number;
    }
    numbers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(""), 0x811c_9dc5);
        assert_eq!(fnv1a("a"), 0xe40c_292c);
        assert_eq!(fnv1a("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn numbers_are_hashes_whatever_the_order() {
        let names = ["spiffe://acme/a", "spiffe://acme/b", "spiffe://acme/c"];
        let numbers = assign(names, &[0]);
        assert_eq!(numbers, names.map(fnv1a));
        let reversed: Vec<&str> = names.iter().rev().copied().collect();
        let mut again = assign(reversed, &[0]);
        again.reverse();
        assert_eq!(again, numbers);
    }

    #[test]
    fn collisions_probe_upward_in_name_order() {
        let hashed = [(7, "b"), (8, "c"), (7, "a"), (u32::MAX, "d"), (0, "e")];
        assert_eq!(
            assign_hashed(&hashed, &[0, u32::MAX]),
            // "a" keeps 7 and "c" 8, so "b" probes past both; reserved hashes
            // probe too, in hash order: "e" from 0, then "d" wrapping past 0.
            [9, 8, 7, 2, 1]
        );
    }

    #[test]
    fn real_collisions_are_resolved() {
        let first = "spiffe://acme.internal/agent/a1545705105";
        let second = "spiffe://acme.internal/agent/a3584380974";
        assert_eq!(fnv1a(first), 0x37d4_d18c);
        assert_eq!(fnv1a(second), 0x37d4_d18c);
        for names in [[first, second], [second, first]] {
            let numbers = assign(names, &[0]);
            let number = |name| numbers[names.iter().position(|&n| n == name).unwrap()];
            assert_eq!((number(first), number(second)), (0x37d4_d18c, 0x37d4_d18d));
        }
    }
}
