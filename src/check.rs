//! `check`: walks every page and block map, verifies every checksum and key order,
//! recomputes every reference count and compares it with the space map (invariants 4 and 5).
//! It reports what it finds; it never panics and never changes the pool.

use crate::format::SUPERBLOCK_UNITS;
use crate::pdata::node::Node;
use crate::space::CONT;
use crate::txn::Engine;
use crate::Result;
use std::collections::{HashMap, HashSet};

/// One thing `check` found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A page failed validation (checksum, location, kind, order, pointers).
    Corrupt {
        /// The page (4 KiB unit) number.
        page: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A unit has references recorded but nothing references it.
    Leaked {
        /// The unit number.
        unit: u64,
        /// Its recorded reference count.
        count: u32,
    },
    /// A unit's recorded count is higher than its references.
    OverReferenced {
        /// The unit number.
        unit: u64,
        /// Its recorded reference count.
        count: u32,
        /// The references found.
        expected: u32,
    },
    /// A unit's recorded count is lower than its references (it could be reused while live).
    UnderReferenced {
        /// The unit number.
        unit: u64,
        /// Its recorded reference count.
        count: u32,
        /// The references found.
        expected: u32,
    },
    /// A block map holds a key outside the keys of its parent, or past the volume's end.
    Misplaced {
        /// The map page holding it.
        page: u64,
        /// Which key, and where it should be.
        detail: String,
    },
    /// The superblock's used-unit total disagrees with the space map.
    UsedMismatch {
        /// The superblock's figure.
        recorded: u64,
        /// The space map's.
        counted: u64,
    },
    /// The catalog's records and indexes disagree (a name or id that leads nowhere, a
    /// record its index does not name, counts that do not add up).
    Catalog {
        /// What disagrees.
        detail: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Corrupt { page, detail } => write!(f, "page {page} is damaged: {detail}"),
            Problem::Leaked { unit, count } => write!(
                f,
                "unit {unit} is counted {count} times but nothing references it (space leaked)"
            ),
            Problem::OverReferenced {
                unit,
                count,
                expected,
            } => write!(
                f,
                "unit {unit} is counted {count} times but referenced {expected} times"
            ),
            Problem::UnderReferenced {
                unit,
                count,
                expected,
            } => write!(
                f,
                "unit {unit} is counted {count} times but referenced {expected} times: it could \
                 be reused while in use"
            ),
            Problem::Misplaced { page, detail } => {
                write!(f, "block map page {page} holds a misplaced key: {detail}")
            }
            Problem::Catalog { detail } => write!(f, "the catalog is inconsistent: {detail}"),
            Problem::UsedMismatch { recorded, counted } => write!(
                f,
                "the superblock records {recorded} used units, the space map counts {counted}"
            ),
        }
    }
}

/// What `check` looked at and what it found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Block map pages verified.
    pub nodes: u64,
    /// Data blocks referenced.
    pub blocks: u64,
    /// Units examined in the space map.
    pub units: u64,
    /// Everything found wrong; empty for a clean pool.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

pub(crate) fn check(e: &mut Engine) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut expected: HashMap<u64, u32> = HashMap::new();
    let block_units = e.store.block_units;
    let bs = e.store.block_size as u64;
    let bump = |exp: &mut HashMap<u64, u32>, u: u64| *exp.entry(u).or_insert(0) += 1;
    for u in 0..SUPERBLOCK_UNITS {
        bump(&mut expected, u);
    }
    for u in e.store.sm.own_pages() {
        bump(&mut expected, u);
    }
    let (c, sm) = e.cat();
    for u in c.pages(sm)? {
        bump(&mut expected, u);
    }
    report.problems.extend(
        c.verify_indexes(sm)?
            .into_iter()
            .map(|detail| Problem::Catalog { detail }),
    );
    // Every map root with the number of blocks its volume or snapshot may map.
    let roots: Vec<(u64, u64)> = c
        .all_volumes(sm)?
        .iter()
        .map(|v| (v.root, v.size.div_ceil(bs)))
        .chain(
            c.all_snapshots(sm)?
                .iter()
                .map(|s| (s.root, s.size.div_ceil(bs))),
        )
        .collect();
    let mut visited: HashSet<u64> = HashSet::new();
    // (node, lowest allowed key, end of allowed keys)
    let mut stack: Vec<(u64, u64, u64)> = Vec::new();
    for &(root, blocks) in &roots {
        if root == 0 {
            continue;
        }
        bump(&mut expected, root);
        stack.push((root, 0, blocks));
    }
    while let Some((loc, lo, hi)) = stack.pop() {
        let node = match e.store.read_node(loc) {
            Ok(n) => n,
            Err(err) => {
                if visited.insert(loc) {
                    report.problems.push(Problem::Corrupt {
                        page: loc,
                        detail: err.to_string(),
                    });
                }
                continue;
            }
        };
        let (first, last) = match &node {
            Node::Leaf(v) => (v[0].0, v[v.len() - 1].0),
            Node::Branch(v) => (v[0].0, v[v.len() - 1].0),
        };
        if first < lo || last >= hi {
            report.problems.push(Problem::Misplaced {
                page: loc,
                detail: format!("keys {first}..={last} outside {lo}..{hi}"),
            });
        }
        if !visited.insert(loc) {
            continue;
        }
        report.nodes += 1;
        match node {
            Node::Leaf(v) => {
                for (key, m) in v {
                    report.blocks += 1;
                    if m.unit % block_units != 0 {
                        report.problems.push(Problem::Corrupt {
                            page: loc,
                            detail: format!("block {key} maps to unaligned unit {}", m.unit),
                        });
                    }
                    bump(&mut expected, m.unit);
                    for t in m.unit + 1..m.unit + block_units {
                        expected.insert(t, CONT);
                    }
                }
            }
            Node::Branch(v) => {
                for (i, (key, child)) in v.iter().enumerate() {
                    let end = v.get(i + 1).map_or(hi, |n| n.0);
                    // The first child may hold keys below its separator only if the parent's
                    // range allows them.
                    let start = if i == 0 { lo } else { *key };
                    bump(&mut expected, *child);
                    stack.push((*child, start, end));
                }
            }
        }
    }
    let total = e.store.sm.total_units();
    let mut counted = 0u64;
    let mut unit = 0;
    while unit < total {
        let count = match e.store.sm.get(unit) {
            Ok(c) => c,
            Err(err) => {
                report.problems.push(Problem::Corrupt {
                    page: unit,
                    detail: format!("space map for unit {unit}: {err}"),
                });
                unit = (unit / crate::space::LEAF_ENTRIES + 1) * crate::space::LEAF_ENTRIES;
                continue;
            }
        };
        report.units += 1;
        counted += u64::from(count != 0);
        let want = expected.get(&unit).copied().unwrap_or(0);
        if count != want {
            report.problems.push(if want == 0 {
                Problem::Leaked { unit, count }
            } else if count > want && count != CONT {
                Problem::OverReferenced {
                    unit,
                    count,
                    expected: want,
                }
            } else {
                Problem::UnderReferenced {
                    unit,
                    count,
                    expected: want,
                }
            });
        }
        unit += 1;
    }
    let recorded = e.store.sm.used_units();
    if recorded != counted {
        report
            .problems
            .push(Problem::UsedMismatch { recorded, counted });
    }
    Ok(report)
}
