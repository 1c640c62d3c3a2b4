//! The cluster file: one volume, its storage nodes and where each PG's six
//! segments live. Read by computed, storctl and storbench; docs/cli.md
//! describes it key by key.
//!
//! ```toml
//! [volume]
//! id = 1
//! page_bytes = 8192
//! pg_pages = 65536
//! pgs = 2
//!
//! [computed]
//! address = "127.0.0.1:7100"
//! # metrics = "127.0.0.1:9100"
//!
//! [[nodes]]
//! id = 1
//! address = "127.0.0.1:7101"
//! az = "az1"
//! # metrics = "127.0.0.1:9101"
//! # ... at least 6
//!
//! [[placement]]          # optional; derived by the rule when absent
//! pg = 0
//! nodes = [1, 2, 3, 4, 5, 6]
//! ```
//!
//! Every rule violation is refused with the line it is on (1-based), so an
//! operator can find it. Placement, when not given for a PG, is derived:
//! AZs in name order, nodes of an AZ in id order; PG `p` takes 3 AZs starting
//! at AZ `3p mod n` (only AZs with 2 nodes or more count) and the next 2
//! nodes of each in a per-AZ round robin, so segments spread evenly over
//! nodes and AZs and the same file always gives the same placement.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use storaged::membership::{Member, Membership};
use toml::Spanned;

/// Segments per PG, and how many of them make a write or read quorum.
pub const SEGMENTS_PER_PG: usize = 6;
pub const WRITE_QUORUM: usize = 4;
pub const READ_QUORUM: usize = 3;
/// Segments of one PG allowed in one AZ: losing an AZ costs at most 2.
pub const SEGMENTS_PER_AZ_MAX: usize = 2;
pub const AZS_MIN: usize = 3;
pub const PAGE_BYTES_MIN: u32 = 4096;
pub const PAGE_BYTES_MAX: u32 = 65536;
/// The membership epoch of the placement the cluster file gives: the
/// membership every PG starts with. A membership change raises it.
pub const PLACEMENT_MEMBERSHIP_EPOCH: u64 = 1;

/// A rule the file breaks, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ClusterError {
    /// 1-based line of the offending value (1 when the whole file is at fault).
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    pub id: u64,
    pub address: SocketAddr,
    pub az: String,
    /// Where the node serves its metrics (`storaged run --metrics`), if the
    /// file says.
    pub metrics: Option<SocketAddr>,
}

/// A validated cluster file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub volume_id: u64,
    pub page_bytes: u32,
    pub pg_pages: u64,
    pub pgs: u32,
    pub computed_address: SocketAddr,
    pub metrics_address: Option<SocketAddr>,
    pub nodes: Vec<StorageNode>,
    /// For each PG (index = PG number), the ids of the nodes holding its
    /// segments, in slot order.
    pub placement: Vec<[u64; SEGMENTS_PER_PG]>,
    /// `[computed] pg_held_bytes_max`: bytes of records computed holds per
    /// PG for segments that lag (see docs/computed.md); None: the default.
    pub pg_held_bytes_max: Option<u64>,
}

/// Least `pg_held_bytes_max` a file may set: one 4 KiB page's record.
pub const PG_HELD_BYTES_MIN: u64 = 4096;

impl Cluster {
    /// Pages in the volume.
    pub fn pages(&self) -> u64 {
        self.pg_pages * u64::from(self.pgs)
    }

    /// The PG holding `page`, or `None` past the end of the volume.
    pub fn pg_of(&self, page: u64) -> Option<u32> {
        if page >= self.pages() {
            return None;
        }
        u32::try_from(page / self.pg_pages).ok()
    }

    pub fn node(&self, id: u64) -> Option<&StorageNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// PG `pg`'s membership as the cluster file places it: its six nodes,
    /// in slot order, with their addresses (where gossip finds its peers),
    /// at [`PLACEMENT_MEMBERSHIP_EPOCH`]. The one place it is built from the
    /// file; `None` for a PG past the volume's end.
    pub fn membership(&self, pg: u32) -> Option<Membership> {
        let slots = self.placement.get(pg as usize)?;
        let mut members = Vec::with_capacity(SEGMENTS_PER_PG);
        for &id in slots {
            // Parsing checked that every placed node is listed.
            let node = self.node(id)?;
            members.push(Member { id, addr: node.address });
        }
        Some(Membership::single(PLACEMENT_MEMBERSHIP_EPOCH, members))
    }

    pub fn load(path: &Path) -> anyhow::Result<Cluster> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Cluster::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Cluster, ClusterError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ClusterError {
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().trim().to_owned(),
        })?;
        validate(text, raw)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    volume: Spanned<RawVolume>,
    computed: RawComputed,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    placement: Vec<RawPlacement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    id: Spanned<u64>,
    page_bytes: Spanned<u32>,
    pg_pages: Spanned<u64>,
    pgs: Spanned<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComputed {
    address: Spanned<String>,
    metrics: Option<Spanned<String>>,
    pg_held_bytes_max: Option<Spanned<RawBytes>>,
}

/// A size: a number of bytes, or a string with a unit ("64k", "16m").
#[derive(Deserialize)]
#[serde(untagged)]
enum RawBytes {
    Count(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<u64>,
    address: Spanned<String>,
    az: Spanned<String>,
    metrics: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    pg: Spanned<u32>,
    nodes: Spanned<Vec<Spanned<u64>>>,
}

fn line_of(text: &str, byte: usize) -> usize {
    let end = byte.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

fn err(text: &str, span: Range<usize>, message: impl Into<String>) -> ClusterError {
    ClusterError {
        line: line_of(text, span.start),
        message: message.into(),
    }
}

fn address(text: &str, s: &Spanned<String>) -> Result<SocketAddr, ClusterError> {
    s.get_ref().parse().map_err(|_| {
        err(
            text,
            s.span(),
            format!("address {:?} is not IP:PORT (e.g. \"10.0.0.5:7101\")", s.get_ref()),
        )
    })
}

fn validate(text: &str, raw: RawFile) -> Result<Cluster, ClusterError> {
    let vol_span = raw.volume.span();
    let vol = raw.volume.into_inner();
    if *vol.id.get_ref() == 0 {
        return Err(err(text, vol.id.span(), "volume id must be nonzero"));
    }
    let page_bytes = *vol.page_bytes.get_ref();
    if !page_bytes.is_power_of_two() || !(PAGE_BYTES_MIN..=PAGE_BYTES_MAX).contains(&page_bytes) {
        return Err(err(
            text,
            vol.page_bytes.span(),
            format!("page_bytes {page_bytes} must be a power of two from {PAGE_BYTES_MIN} to {PAGE_BYTES_MAX}"),
        ));
    }
    if *vol.pg_pages.get_ref() == 0 {
        return Err(err(text, vol.pg_pages.span(), "pg_pages must be at least 1"));
    }
    let pgs = *vol.pgs.get_ref();
    if pgs == 0 {
        return Err(err(text, vol.pgs.span(), "pgs must be at least 1"));
    }
    if vol.pg_pages.get_ref().checked_mul(u64::from(pgs)).is_none() {
        return Err(err(text, vol.pgs.span(), "pgs * pg_pages overflows"));
    }
    let computed_address = address(text, &raw.computed.address)?;
    let metrics_address = raw.computed.metrics.as_ref().map(|m| address(text, m)).transpose()?;

    let mut nodes = Vec::with_capacity(raw.nodes.len());
    let mut node_line = HashMap::new();
    let mut addresses = HashSet::new();
    for n in &raw.nodes {
        let id = *n.id.get_ref();
        if node_line.insert(id, n.id.span()).is_some() {
            return Err(err(text, n.id.span(), format!("node id {id} appears twice")));
        }
        let addr = address(text, &n.address)?;
        if !addresses.insert(addr) {
            return Err(err(
                text,
                n.address.span(),
                format!("node address {addr} appears twice"),
            ));
        }
        if n.az.get_ref().is_empty() {
            return Err(err(text, n.az.span(), "az must not be empty"));
        }
        nodes.push(StorageNode {
            id,
            address: addr,
            az: n.az.get_ref().clone(),
            metrics: n.metrics.as_ref().map(|m| address(text, m)).transpose()?,
        });
    }
    if nodes.len() < SEGMENTS_PER_PG {
        let span = raw.nodes.last().map_or(vol_span, |n| n.id.span());
        return Err(err(
            text,
            span,
            format!(
                "{} storage nodes; a volume needs at least {SEGMENTS_PER_PG} (6 segments per PG on 6 nodes)",
                nodes.len()
            ),
        ));
    }
    let az_of: HashMap<u64, &str> = nodes.iter().map(|n| (n.id, n.az.as_str())).collect();

    let mut placement: Vec<Option<[u64; SEGMENTS_PER_PG]>> = vec![None; pgs as usize];
    for p in &raw.placement {
        let pg = *p.pg.get_ref();
        if pg >= pgs {
            return Err(err(
                text,
                p.pg.span(),
                format!("placement for PG {pg}, but the volume has PGs 0..{pgs}"),
            ));
        }
        if placement[pg as usize].is_some() {
            return Err(err(text, p.pg.span(), format!("PG {pg} is placed twice")));
        }
        let list = p.nodes.get_ref();
        if list.len() != SEGMENTS_PER_PG {
            return Err(err(
                text,
                p.nodes.span(),
                format!("PG {pg} lists {} nodes; it needs exactly {SEGMENTS_PER_PG}", list.len()),
            ));
        }
        let mut slots = [0u64; SEGMENTS_PER_PG];
        let mut seen = HashSet::new();
        let mut per_az: HashMap<&str, usize> = HashMap::new();
        for (slot, id) in list.iter().enumerate() {
            let node = *id.get_ref();
            let Some(&az) = az_of.get(&node) else {
                return Err(err(
                    text,
                    id.span(),
                    format!("PG {pg} is placed on node {node}, which is not in [[nodes]]"),
                ));
            };
            if !seen.insert(node) {
                return Err(err(text, id.span(), format!("PG {pg} has two segments on node {node}")));
            }
            let count = per_az.entry(az).or_default();
            *count += 1;
            if *count > SEGMENTS_PER_AZ_MAX {
                return Err(err(
                    text,
                    id.span(),
                    format!("PG {pg} has more than {SEGMENTS_PER_AZ_MAX} segments in AZ {az:?}"),
                ));
            }
            slots[slot] = node;
        }
        placement[pg as usize] = Some(slots);
    }

    let derived = derive_placement(&nodes, pgs);
    let mut final_placement = Vec::with_capacity(pgs as usize);
    for (pg, explicit) in placement.into_iter().enumerate() {
        match explicit {
            Some(slots) => final_placement.push(slots),
            None => match &derived {
                Ok(all) => final_placement.push(all[pg]),
                Err(why) => {
                    let span = raw.nodes.last().map_or(vol_span.clone(), |n| n.az.span());
                    return Err(err(text, span, format!("cannot place PG {pg}: {why}")));
                }
            },
        }
    }
    let pg_held_bytes_max = match &raw.computed.pg_held_bytes_max {
        None => None,
        Some(v) => {
            let bytes = match v.get_ref() {
                RawBytes::Count(n) => *n,
                RawBytes::Text(t) => storaged::units::parse_bytes(t).map_err(|e| err(text, v.span(), e))?,
            };
            if bytes < PG_HELD_BYTES_MIN {
                return Err(err(
                    text,
                    v.span(),
                    format!("pg_held_bytes_max must be at least {PG_HELD_BYTES_MIN}, not {bytes}"),
                ));
            }
            Some(bytes)
        }
    };
    Ok(Cluster {
        pg_held_bytes_max,
        volume_id: *vol.id.get_ref(),
        page_bytes,
        pg_pages: *vol.pg_pages.get_ref(),
        pgs,
        computed_address,
        metrics_address,
        nodes,
        placement: final_placement,
    })
}

/// The placement rule (see the module header). Deterministic.
pub fn derive_placement(nodes: &[StorageNode], pgs: u32) -> Result<Vec<[u64; SEGMENTS_PER_PG]>, String> {
    let mut by_az: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for n in nodes {
        by_az.entry(n.az.as_str()).or_default().push(n.id);
    }
    let mut azs: Vec<Vec<u64>> = by_az
        .into_values()
        .filter(|ids| ids.len() >= SEGMENTS_PER_AZ_MAX)
        .map(|mut ids| {
            ids.sort_unstable();
            ids
        })
        .collect();
    if azs.len() < AZS_MIN {
        return Err(format!(
            "deriving placement needs at least {AZS_MIN} AZs with {SEGMENTS_PER_AZ_MAX} nodes or more each; \
             the file has {} (add nodes or give [[placement]] explicitly)",
            azs.len()
        ));
    }
    let mut cursor = vec![0usize; azs.len()];
    let mut out = Vec::with_capacity(pgs as usize);
    for pg in 0..pgs as usize {
        let mut slots = [0u64; SEGMENTS_PER_PG];
        for k in 0..AZS_MIN {
            let a = (pg * AZS_MIN + k) % azs.len();
            let ids = &mut azs[a];
            for j in 0..SEGMENTS_PER_AZ_MAX {
                slots[k * SEGMENTS_PER_AZ_MAX + j] = ids[(cursor[a] + j) % ids.len()];
            }
            cursor[a] = (cursor[a] + SEGMENTS_PER_AZ_MAX) % ids.len();
        }
        out.push(slots);
    }
    Ok(out)
}

/// A cluster file for `n` nodes on 127.0.0.1 in 3 AZs, for tests and dev clusters.
pub fn local_cluster_toml(volume: u64, pgs: u32, pg_pages: u64, computed: SocketAddr, nodes: &[SocketAddr]) -> String {
    let mut s = format!(
        "[volume]\nid = {volume}\npage_bytes = 8192\npg_pages = {pg_pages}\npgs = {pgs}\n\n\
         [computed]\naddress = \"{computed}\"\n"
    );
    for (i, a) in nodes.iter().enumerate() {
        s.push_str(&format!(
            "\n[[nodes]]\nid = {}\naddress = \"{a}\"\naz = \"az{}\"\n",
            i + 1,
            i % 3 + 1
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes_toml(n: usize, azs: usize) -> String {
        let mut s = String::new();
        for i in 1..=n {
            s.push_str(&format!(
                "[[nodes]]\nid = {i}\naddress = \"127.0.0.1:{}\"\naz = \"az{}\"\n\n",
                7100 + i,
                (i - 1) % azs + 1
            ));
        }
        s
    }

    fn file(pgs: u32, nodes: &str, placement: &str) -> String {
        format!(
            "[volume]\nid = 1\npage_bytes = 8192\npg_pages = 65536\npgs = {pgs}\n\n\
             [computed]\naddress = \"127.0.0.1:7100\"\n\n{nodes}{placement}"
        )
    }

    #[test]
    fn a_node_s_metrics_address_is_kept_and_a_bad_one_refused_with_its_line() {
        let with =
            |v: &str| file(1, &nodes_toml(6, 3), "").replacen("id = 2\n", &format!("id = 2\nmetrics = {v}\n"), 1);
        let c = Cluster::parse(&with("\"127.0.0.1:9102\"")).unwrap();
        assert_eq!(c.node(2).unwrap().metrics, Some("127.0.0.1:9102".parse().unwrap()));
        assert_eq!(c.node(1).unwrap().metrics, None);
        let text = with("\"127.0.0.1\"");
        let e = Cluster::parse(&text).unwrap_err();
        let line = text.lines().position(|l| l.starts_with("metrics")).unwrap() + 1;
        assert_eq!(e.line, line, "{e}");
        assert!(e.message.contains("127.0.0.1") && e.message.contains("IP:PORT"), "{e}");
        assert!(Cluster::parse(&with("9102")).is_err());
    }

    #[test]
    fn the_hold_for_lagging_segments_is_a_size_with_a_floor() {
        let with = |v: &str| {
            file(1, &nodes_toml(6, 3), "").replacen(
                "[computed]\n",
                &format!("[computed]\npg_held_bytes_max = {v}\n"),
                1,
            )
        };
        assert_eq!(Cluster::parse(&with("\"64k\"")).unwrap().pg_held_bytes_max, Some(65536));
        assert_eq!(Cluster::parse(&with("8192")).unwrap().pg_held_bytes_max, Some(8192));
        assert_eq!(
            Cluster::parse(&file(1, &nodes_toml(6, 3), ""))
                .unwrap()
                .pg_held_bytes_max,
            None
        );
        let e = refused(&with("100"));
        assert!(e.message.contains("at least 4096"), "{e:?}");
        assert_eq!(e.line, line_with(&with("100"), "pg_held_bytes_max", 0));
        let e = refused(&with("\"lots\""));
        assert!(e.message.contains("not a size"), "{e:?}");
    }

    fn refused(text: &str) -> ClusterError {
        match Cluster::parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e,
        }
    }

    fn line_with(text: &str, needle: &str, nth: usize) -> usize {
        text.lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(nth)
            .map(|(i, _)| i + 1)
            .expect("needle in text")
    }

    fn check_rules(c: &Cluster) {
        for slots in &c.placement {
            let set: HashSet<u64> = slots.iter().copied().collect();
            assert_eq!(set.len(), SEGMENTS_PER_PG);
            let mut per_az: HashMap<&str, usize> = HashMap::new();
            for id in slots {
                *per_az.entry(c.node(*id).unwrap().az.as_str()).or_default() += 1;
            }
            assert_eq!(per_az.len(), 3);
            assert!(per_az.values().all(|&n| n == 2));
        }
    }

    #[test]
    fn a_valid_file_with_derived_placement() {
        let c = Cluster::parse(&file(2, &nodes_toml(6, 3), "")).unwrap();
        assert_eq!(c.volume_id, 1);
        assert_eq!(c.pages(), 2 * 65536);
        assert_eq!(c.pg_of(65536), Some(1));
        assert_eq!(c.pg_of(2 * 65536), None);
        assert_eq!(c.placement.len(), 2);
        check_rules(&c);
        // Deterministic.
        assert_eq!(c, Cluster::parse(&file(2, &nodes_toml(6, 3), "")).unwrap());
    }

    #[test]
    fn derived_placement_spreads_evenly() {
        let c = Cluster::parse(&file(12, &nodes_toml(12, 4), "")).unwrap();
        check_rules(&c);
        let mut per_node: HashMap<u64, usize> = HashMap::new();
        for slots in &c.placement {
            for id in slots {
                *per_node.entry(*id).or_default() += 1;
            }
        }
        // 72 segments over 12 nodes.
        assert_eq!(per_node.len(), 12);
        assert!(per_node.values().all(|&n| n == 6), "{per_node:?}");
    }

    #[test]
    fn explicit_placement_is_used() {
        let text = file(
            1,
            &nodes_toml(7, 3),
            "[[placement]]\npg = 0\nnodes = [7, 2, 3, 4, 5, 6]\n",
        );
        let c = Cluster::parse(&text).unwrap();
        assert_eq!(c.placement[0], [7, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn fewer_than_six_nodes() {
        let text = file(1, &nodes_toml(5, 3), "");
        let e = refused(&text);
        assert!(e.message.contains("at least 6"), "{e}");
        assert_eq!(e.line, line_with(&text, "id = 5", 0));
    }

    #[test]
    fn duplicate_node_id() {
        let text = file(1, &nodes_toml(6, 3), "").replace("id = 6", "id = 2");
        let e = refused(&text);
        assert!(e.message.contains("node id 2 appears twice"), "{e}");
        assert_eq!(e.line, line_with(&text, "id = 2", 1));
    }

    #[test]
    fn duplicate_address() {
        let text = file(1, &nodes_toml(6, 3), "").replace("127.0.0.1:7106", "127.0.0.1:7101");
        let e = refused(&text);
        assert!(e.message.contains("appears twice"), "{e}");
        assert_eq!(e.line, line_with(&text, "127.0.0.1:7101", 1));
    }

    #[test]
    fn two_segments_on_one_node() {
        let text = file(
            1,
            &nodes_toml(6, 3),
            "\n[[placement]]\npg = 0\nnodes = [1, 2, 3, 4, 5,\n 1]\n",
        );
        let e = refused(&text);
        assert!(e.message.contains("two segments on node 1"), "{e}");
        assert_eq!(e.line, line_with(&text, " 1]", 0));
    }

    #[test]
    fn three_segments_in_one_az() {
        // Nodes 1, 4, 7 are in az1.
        let text = file(
            1,
            &nodes_toml(9, 3),
            "[[placement]]\npg = 0\nnodes = [1, 4, 7, 2, 3, 5]\n",
        );
        let e = refused(&text);
        assert!(e.message.contains("more than 2 segments in AZ \"az1\""), "{e}");
        assert_eq!(e.line, line_with(&text, "nodes = [1, 4, 7", 0));
    }

    #[test]
    fn unknown_node_in_placement() {
        let text = file(
            1,
            &nodes_toml(6, 3),
            "[[placement]]\npg = 0\nnodes = [1, 2, 3, 4, 5, 99]\n",
        );
        let e = refused(&text);
        assert!(e.message.contains("node 99, which is not in [[nodes]]"), "{e}");
        assert_eq!(e.line, line_with(&text, "99", 0));
    }

    #[test]
    fn placement_for_a_pg_out_of_range() {
        let text = file(
            2,
            &nodes_toml(6, 3),
            "[[placement]]\npg = 2\nnodes = [1, 2, 3, 4, 5, 6]\n",
        );
        let e = refused(&text);
        assert!(e.message.contains("PG 2"), "{e}");
        assert_eq!(e.line, line_with(&text, "pg = 2", 0));
    }

    #[test]
    fn fewer_than_three_azs_when_derived() {
        let text = file(1, &nodes_toml(6, 2), "");
        let e = refused(&text);
        assert!(e.message.contains("at least 3 AZs"), "{e}");
        // The same nodes with an explicit placement that keeps the AZ rule are still refused for the AZ limit.
        let explicit = file(
            1,
            &nodes_toml(6, 2),
            "[[placement]]\npg = 0\nnodes = [1, 2, 3, 4, 5, 6]\n",
        );
        assert!(refused(&explicit).message.contains("more than 2 segments"));
    }

    #[test]
    fn bad_values_name_their_line() {
        let text = file(1, &nodes_toml(6, 3), "").replace("page_bytes = 8192", "page_bytes = 5000");
        let e = refused(&text);
        assert_eq!(e.line, 3);
        let text = file(1, &nodes_toml(6, 3), "").replace("id = 1\npage", "id = 0\npage");
        assert_eq!(refused(&text).line, 2);
        let text = file(1, &nodes_toml(6, 3), "").replace("address = \"127.0.0.1:7103\"", "address = \"nowhere\"");
        let e = refused(&text);
        assert_eq!(e.line, line_with(&text, "nowhere", 0));
        // A syntax error is reported with its line too.
        let text = file(1, &nodes_toml(6, 3), "").replace("az = \"az2\"", "az = ");
        let e = refused(&text);
        assert_eq!(e.line, line_with(&text, "az = ", 1), "{e}");
        // Unknown keys are refused.
        let text = file(1, &nodes_toml(6, 3), "").replace("pgs = 1", "pgs = 1\ncolour = 3");
        assert_eq!(refused(&text).line, line_with(&text, "colour", 0));
    }

    #[test]
    fn the_local_cluster_helper_writes_a_valid_file() {
        let nodes: Vec<SocketAddr> = (1..=6)
            .map(|i| format!("127.0.0.1:{}", 7000 + i).parse().unwrap())
            .collect();
        let c = Cluster::parse(&local_cluster_toml(3, 2, 16, "127.0.0.1:7000".parse().unwrap(), &nodes)).unwrap();
        check_rules(&c);
    }

    #[test]
    fn a_pgs_membership_is_its_placement_with_the_nodes_addresses() {
        let c = Cluster::parse(&file(2, &nodes_toml(9, 3), "")).unwrap();
        for pg in 0..2 {
            let m = c.membership(pg).expect("a PG of the volume");
            m.check().expect("a valid membership");
            assert_eq!(m.epoch, PLACEMENT_MEMBERSHIP_EPOCH);
            assert!(!m.is_changing());
            let ids: Vec<u64> = m.members.iter().map(|x| x.id).collect();
            assert_eq!(ids, c.placement[pg as usize].to_vec(), "slot order");
            for x in &m.members {
                assert_eq!(x.addr, c.node(x.id).unwrap().address);
            }
        }
        assert_eq!(c.membership(2), None, "past the volume's end");
    }
}
