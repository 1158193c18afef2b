//! Generic persistent data structures, apart from anything volumes mean: the byte encodings
//! of keys and values ([`codec`]), a bounded cache of decoded pages that knows which pages
//! the open transaction owns ([`page_cache`]), a copy-on-write B+tree generic over its key
//! and value types ([`btree`]), a one-page write buffer in front of it for trees whose
//! changes scatter ([`buffer`]), and the two-tree diff ([`diff`]). The block maps and the
//! catalog are instances of the tree (thin-provisioning-tools keeps `pdata/` apart from
//! `thin/` for the same reason: the tree's rules for sharing, shadowing and freeing are
//! proved once, for every user).

pub(crate) mod btree;
pub(crate) mod buffer;
pub(crate) mod codec;
pub(crate) mod diff;
pub(crate) mod node;
pub(crate) mod page_cache;
