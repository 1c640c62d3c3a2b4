//! Generators for every message, and mutations of encoded frames.

use proptest::prelude::*;

use crate::membership::{Member, Membership};
use crate::proto::{Damage, ErrorCode, GossipDigest, Hydration, Message, Role, WirePageVersion};
use crate::record::{RecordBody, RedoRecord, SegmentId, WireRecord};
use crate::scrub::{Area, AreaReport, Damaged, Filter, Finding, PassReport, Running, Status};

fn arb_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Computed), Just(Role::StorageNode), Just(Role::Operator)]
}

fn arb_error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=18).prop_map(|v| ErrorCode::from_u16(v).expect("1..=18 are codes"))
}

/// 1–4 records of one segment with strictly increasing LSNs, random bodies.
/// 0–4 valid truncation ranges.
fn arb_ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec(
        (1u64..(1 << 50), 0u64..(1 << 40)).prop_map(|(lo, len)| (lo, lo + len)),
        0..=4,
    )
}

/// Holes: closed ranges, and the open one (`hi` = `u64::MAX`) a damaged log leaves.
fn arb_holes() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec(
        (1u64..(1 << 50), 0u64..(1 << 40), any::<bool>()).prop_map(|(lo, len, open)| {
            let hi = if open { u64::MAX } else { lo + len };
            (lo, hi)
        }),
        0..=crate::segment::HOLES_REPORTED_MAX,
    )
}

/// Damage: up to the reported maximum of listed pages, a total at least that.
fn arb_damage() -> impl Strategy<Value = Damage> {
    (
        prop::collection::btree_set(any::<u64>(), 0..=crate::segment::DAMAGED_PAGES_REPORTED_MAX),
        0u32..1000,
        any::<bool>(),
    )
        .prop_map(|(pages, more, table_slot)| Damage {
            pages_total: pages.len() as u32 + more,
            pages: pages.into_iter().collect(),
            table_slot,
        })
}

fn arb_batch() -> impl Strategy<Value = (u64, u32, Vec<RedoRecord>)> {
    let one = (
        1u64..1000,
        any::<u64>(),
        any::<bool>(),
        prop::option::of(any::<u32>()),
        prop::collection::vec(any::<u8>(), 0..200),
    );
    (
        any::<u64>(),
        any::<u32>(),
        1u64..(1 << 40),
        prop::collection::vec(one, 1..5),
    )
        .prop_map(|(volume, pg, first_lsn, parts)| {
            let mut lsn = first_lsn;
            let mut records = Vec::new();
            for (gap, page, cpl, delta, bytes) in parts {
                let prev = lsn;
                lsn += gap;
                records.push(RedoRecord {
                    segment: SegmentId { volume, pg },
                    lsn,
                    prev_lsn_pg: prev,
                    prev_lsn_page: lsn / 2,
                    page,
                    cpl,
                    body: match delta {
                        Some(offset) => RecordBody::PageDelta { offset, bytes },
                        None => RecordBody::PageImage(bytes),
                    },
                });
            }
            (volume, pg, records)
        })
}

/// A valid membership: six members, or seven while one is being replaced.
fn arb_membership() -> impl Strategy<Value = Membership> {
    (1u64..u64::MAX, 1u64..1000, any::<bool>(), any::<u16>())
        .prop_map(|(epoch, base, changing, port)| {
            let members = (base..base + 7)
                .map(|id| Member {
                    id,
                    addr: std::net::SocketAddr::from(([127, 0, 0, 1], port.wrapping_add(id as u16))),
                })
                .collect();
            Membership {
                epoch,
                members,
                old: 0b0011_1111,
                new: if changing { 0b0101_1111 } else { 0b0011_1111 },
            }
        })
        .prop_map(|mut m| {
            if !m.is_changing() {
                m.members.pop();
            }
            m
        })
}

fn arb_segment_id() -> impl Strategy<Value = SegmentId> {
    (any::<u64>(), any::<u32>()).prop_map(|(volume, pg)| SegmentId { volume, pg })
}

fn arb_filter() -> impl Strategy<Value = Filter> {
    prop_oneof![
        Just(Filter::All),
        prop::collection::vec(arb_segment_id(), 0..8).prop_map(Filter::Segments),
    ]
}

fn arb_finding() -> impl Strategy<Value = Finding> {
    let what = prop_oneof![
        Just(Damaged::LogBlock),
        (any::<u64>(), any::<u64>()).prop_map(|(page, lsn)| Damaged::PageVersion { page, lsn }),
        any::<u64>().prop_map(|page| Damaged::OlderSlot { page }),
        any::<u64>().prop_map(|first_page| Damaged::PageMap { first_page }),
    ];
    (any::<u64>(), what, "\\PC{0,40}", any::<bool>()).prop_map(|(offset, what, error, repaired)| Finding {
        offset,
        what,
        error,
        repaired,
    })
}

/// An area's counts with `found - repaired` at least the findings listed.
fn arb_area() -> impl Strategy<Value = (Area, AreaReport)> {
    (
        prop::option::of(arb_segment_id()),
        any::<u64>(),
        any::<u64>(),
        0u64..1000,
        0u64..1000,
        prop::collection::vec(arb_finding(), 0..4),
    )
        .prop_map(|(segment, blocks_checked, pages_checked, repaired, more, left)| {
            let area = segment.map_or(Area::Log, Area::Segment);
            let report = AreaReport {
                blocks_checked,
                pages_checked,
                found: repaired + left.len() as u64 + more,
                repaired,
                left,
            };
            (area, report)
        })
}

pub(super) fn arb_scrub_status() -> impl Strategy<Value = Status> {
    let running = (any::<u64>(), any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
        |(pass, priority, bytes_done, bytes_total)| Running {
            pass,
            priority,
            bytes_done,
            bytes_total,
        },
    );
    let pass = (
        prop::array::uniform4(any::<u64>()),
        any::<bool>(),
        prop::collection::vec(arb_area(), 0..4),
    )
        .prop_map(|(v, priority, areas)| PassReport {
            pass: v[0],
            priority,
            started_unix_secs: v[1],
            ended_unix_secs: v[2],
            bytes_read: v[3],
            areas,
        });
    (
        prop::option::of(running),
        prop::option::of(pass),
        prop::array::uniform3(any::<u64>()),
    )
        .prop_map(|(running, last, v)| Status {
            running,
            last,
            found_total: v[0],
            repaired_total: v[1],
            left_now: v[2],
        })
}

pub(super) fn arb_message() -> impl Strategy<Value = Message> {
    let u = any::<u64>;
    prop_oneof![
        (arb_role(), u(), any::<u16>()).prop_map(|(role, node_id, protocol_version)| {
            Message::Hello {
                role,
                node_id,
                protocol_version,
            }
        }),
        (u(), any::<u16>()).prop_map(|(node_id, protocol_version)| Message::HelloOk {
            node_id,
            protocol_version
        }),
        (arb_batch(), u(), any::<u32>(), u(), u()).prop_map(
            |((volume, pg, records), epoch, page_bytes, pg_pages, membership_epoch)| Message::Append {
                volume,
                epoch,
                pg,
                page_bytes,
                pg_pages,
                membership_epoch,
                records: records.into_iter().map(WireRecord::new).collect(),
            }
        ),
        (u(), any::<u32>(), u(), u()).prop_map(|(volume, pg, scl, incarnation)| Message::AppendAck {
            volume,
            pg,
            scl,
            incarnation
        }),
        (u(), u(), any::<u32>(), u(), u(), u()).prop_map(|(volume, epoch, pg, page, read_point, membership_epoch)| {
            Message::GetPage {
                volume,
                epoch,
                pg,
                page,
                read_point,
                membership_epoch,
            }
        }),
        (u(), any::<u32>(), u(), u(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(
            |(volume, pg, page, lsn, bytes)| Message::Page {
                volume,
                pg,
                page,
                lsn,
                bytes
            }
        ),
        (u(), u(), any::<u32>(), u()).prop_map(|(volume, epoch, pg, lsn)| Message::SetPgmrpl {
            volume,
            epoch,
            pg,
            lsn
        }),
        (u(), any::<u32>(), u()).prop_map(|(volume, pg, pgmrpl)| Message::PgmrplOk { volume, pg, pgmrpl }),
        (u(), u(), any::<u32>()).prop_map(|(volume, epoch, pg)| Message::GetSegmentStatus { volume, epoch, pg }),
        (
            u(),
            any::<u32>(),
            prop::array::uniform10(u()),
            arb_ranges(),
            arb_holes(),
            arb_damage(),
            prop::option::of(arb_membership()),
            prop::option::of(
                (any::<bool>(), u(), u()).prop_map(|(under_way, bytes, pages)| Hydration {
                    under_way,
                    bytes,
                    pages
                })
            )
        )
            .prop_map(|(volume, pg, v, annulled, holes, damage, membership, hydration)| {
                Message::SegmentStatus {
                    volume,
                    pg,
                    epoch: v[0],
                    scl: v[1],
                    highest_lsn: v[2],
                    lowest_lsn: v[3],
                    pgmrpl: v[4],
                    records: v[5],
                    log_bytes: v[6],
                    page_store_bytes: v[7],
                    installed_epoch: v[8],
                    incarnation: v[9],
                    annulled,
                    holes,
                    damage,
                    membership,
                    hydration,
                }
            }),
        (u(), u(), any::<u32>(), any::<u32>(), u()).prop_map(|(volume, epoch, pg, page_bytes, pg_pages)| {
            Message::Seal {
                volume,
                epoch,
                pg,
                page_bytes,
                pg_pages,
            }
        }),
        (u(), u(), any::<u32>(), arb_ranges()).prop_map(|(volume, epoch, pg, ranges)| Message::Truncate {
            volume,
            epoch,
            pg,
            ranges
        }),
        (u(), u(), any::<u32>(), u(), any::<u32>()).prop_map(|(volume, epoch, pg, after, max_bytes)| {
            Message::ReadRecords {
                volume,
                epoch,
                pg,
                after,
                max_bytes,
            }
        }),
        (arb_batch(), u(), any::<bool>()).prop_map(|((volume, pg, records), scl, empty)| Message::Records {
            volume,
            pg,
            scl,
            records: if empty { Vec::new() } else { records },
        }),
        (
            u(),
            u(),
            any::<u32>(),
            any::<u32>(),
            u(),
            arb_membership(),
            arb_ranges()
        )
            .prop_map(|(volume, epoch, pg, page_bytes, pg_pages, membership, annulled)| {
                Message::SetMembership {
                    volume,
                    epoch,
                    pg,
                    page_bytes,
                    pg_pages,
                    membership,
                    annulled,
                }
            }),
        (u(), any::<u32>(), prop::array::uniform5(u()), any::<bool>()).prop_map(|(volume, pg, v, ok)| {
            let digest = GossipDigest {
                installed_epoch: v[0],
                membership_epoch: v[1],
                scl: v[2],
                highest_lsn: v[3],
                floor: v[4],
            };
            if ok {
                Message::DigestOk { volume, pg, digest }
            } else {
                Message::Digest { volume, pg, digest }
            }
        }),
        (
            u(),
            any::<u32>(),
            prop::array::uniform4(u()),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(volume, pg, v, max_bytes, pages)| if pages {
                Message::GetPageVersions {
                    volume,
                    pg,
                    installed_epoch: v[0],
                    membership_epoch: v[1],
                    first_page: v[2],
                    max_bytes,
                    changed_after: v[3],
                }
            } else {
                Message::PullRecords {
                    volume,
                    pg,
                    installed_epoch: v[0],
                    membership_epoch: v[1],
                    after: v[2],
                    max_bytes,
                }
            }),
        (
            u(),
            any::<u32>(),
            u(),
            u(),
            prop::collection::vec((u(), u(), prop::collection::vec(any::<u8>(), 0..64)), 0..4)
        )
            .prop_map(|(volume, pg, floor, next_page, versions)| Message::PageVersions {
                volume,
                pg,
                floor,
                next_page,
                versions: versions
                    .into_iter()
                    .map(|(page, lsn, bytes)| WirePageVersion { page, lsn, bytes })
                    .collect(),
            }),
        arb_filter().prop_map(|filter| Message::Scrub { filter }),
        u().prop_map(|pass| Message::ScrubStarted { pass }),
        Just(Message::ScrubStatus),
        (u(), any::<u32>()).prop_map(|(volume, pg)| Message::FillGaps { volume, pg }),
        (u(), any::<u32>()).prop_map(|(volume, pg)| Message::FillGapsOk { volume, pg }),
        Just(Message::NodeStatus),
        prop::array::uniform5(u()).prop_map(|v| Message::NodeStatusOk {
            status: crate::proto::NodeStatus {
                node_id: v[0],
                page_store_blocks: v[1],
                page_store_free_blocks: v[2],
                log_blocks: v[3],
                log_free_blocks: v[4],
            },
        }),
        arb_scrub_status().prop_map(|status| Message::ScrubStatusOk { status }),
        (u(), any::<u32>(), prop::array::uniform4(u())).prop_map(|(volume, pg, v)| Message::GetPageAt {
            volume,
            pg,
            installed_epoch: v[0],
            membership_epoch: v[1],
            page: v[2],
            lsn: v[3],
        }),
        (u(), any::<u32>(), u(), u(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(
            |(volume, pg, page, lsn, bytes)| Message::PageAt {
                volume,
                pg,
                page,
                lsn,
                bytes,
            }
        ),
        (arb_error_code(), u(), "\\PC{0,60}").prop_map(|(code, current_epoch, message)| {
            Message::Error {
                code,
                current_epoch,
                message,
            }
        }),
    ]
}

#[derive(Debug, Clone)]
pub(super) enum Mutation {
    FlipBit { at: usize, bit: u8 },
    Truncate { len: usize },
    SetLength(u32),
    Insert { at: usize, byte: u8 },
}

pub(super) fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        any::<u32>().prop_map(Mutation::SetLength),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
    ]
}

pub(super) fn mutate(frame: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::FlipBit { at, bit } => {
            if !frame.is_empty() {
                let at = at % frame.len();
                frame[at] ^= 1 << bit;
            }
        }
        Mutation::Truncate { len } => frame.truncate(len % (frame.len() + 1)),
        Mutation::SetLength(length) => {
            if frame.len() >= 4 {
                frame[..4].copy_from_slice(&length.to_le_bytes());
            }
        }
        Mutation::Insert { at, byte } => frame.insert(at % (frame.len() + 1), byte),
    }
}
