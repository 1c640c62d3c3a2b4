//! Tests of the wire protocol: roundtrips of every message, partial input,
//! streams, fuzzed and mutated frames (here); hand-built frames for each
//! check and the allocation bound (`cases`); generators (`strategies`).

mod cases;
mod scrub_cases;
mod strategies;

use proptest::prelude::*;

use super::*;
use crate::record::{RecordBody, RedoRecord, SegmentId};
use strategies::{arb_message, arb_mutation, mutate};

// --- helpers ---------------------------------------------------------------

/// A frame built by hand, with a correct CRC, so tests can reach the checks
/// that follow the CRC with bytes the encoder would never produce.
pub(super) fn raw_frame(version: u8, kind: u8, flags: u16, request_id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((FRAME_LENGTH_MIN + body.len()) as u32).to_le_bytes());
    f.push(version);
    f.push(kind);
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&request_id.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(body);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[4..16]), &f[20..]);
    f[16..20].copy_from_slice(&crc.to_le_bytes());
    f
}

/// The CRC rule, restated independently of the decoder.
pub(super) fn crc_matches(frame: &[u8]) -> bool {
    let stored = u32::from_le_bytes([frame[16], frame[17], frame[18], frame[19]]);
    stored == crc32c::crc32c_append(crc32c::crc32c(&frame[4..16]), &frame[20..])
}

pub(super) fn encode(request_id: u64, msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(request_id, msg, &mut out).expect("test messages are valid");
    out
}

pub(super) fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    decode_frame(buf, FRAME_BYTES_MAX)
}

pub(super) fn record(volume: u64, pg: u32, lsn: u64, payload: Vec<u8>) -> RedoRecord {
    RedoRecord {
        segment: SegmentId { volume, pg },
        lsn,
        prev_lsn_pg: lsn - 1,
        prev_lsn_page: 0,
        page: 7,
        cpl: false,
        body: RecordBody::PageImage(payload),
    }
}

pub(super) fn u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

// --- properties ------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_roundtrips(msg in arb_message(), request_id in any::<u64>()) {
        let buf = encode(request_id, &msg);
        prop_assert_eq!(buf.len(), FRAME_HEADER_BYTES + msg.body_len());
        let (frame, used) = decode(&buf).unwrap().expect("a whole frame");
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(frame.request_id, request_id);
        prop_assert_eq!(frame.message.kind(), msg.kind());
        prop_assert_eq!(frame.message, msg);
    }

    #[test]
    fn every_prefix_is_incomplete(msg in arb_message()) {
        let buf = encode(3, &msg);
        for cut in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..cut]), Ok(None), "prefix of {} bytes", cut);
        }
    }

    #[test]
    fn byte_by_byte_yields_the_frame_once(msg in arb_message()) {
        let buf = encode(9, &msg);
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut frames = Vec::new();
        for b in &buf {
            decoder.push(std::slice::from_ref(b));
            while let Some(frame) = decoder.next().unwrap() {
                frames.push(frame);
            }
        }
        prop_assert_eq!(frames, vec![Frame { request_id: 9, message: msg }]);
        prop_assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn concatenated_frames_decode_in_order(
        msgs in prop::collection::vec(arb_message(), 1..6),
        chunk in 1usize..64,
    ) {
        let mut buf = Vec::new();
        let mut ends = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            encode_frame(i as u64, msg, &mut buf).unwrap();
            ends.push(buf.len());
        }
        // One buffer, decoded front to back.
        let mut at = 0;
        for (i, msg) in msgs.iter().enumerate() {
            let (frame, used) = decode(&buf[at..]).unwrap().expect("a whole frame");
            prop_assert_eq!(frame.request_id, i as u64);
            prop_assert_eq!(&frame.message, msg);
            at += used;
            prop_assert_eq!(at, ends[i]);
        }
        prop_assert_eq!(decode(&buf[at..]), Ok(None));
        // The same stream in chunks through the decoder.
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
        let mut got = Vec::new();
        for piece in buf.chunks(chunk) {
            decoder.push(piece);
            while let Some(frame) = decoder.next().unwrap() {
                got.push(frame.message);
            }
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
        if let Ok(Some((_, used))) = decode(&bytes) {
            prop_assert!(crc_matches(&bytes[..used]));
        }
    }

    #[test]
    fn mutated_frames_never_pass_a_bad_crc(
        msg in arb_message(),
        mutations in prop::collection::vec(arb_mutation(), 1..4),
    ) {
        let mut buf = encode(5, &msg);
        for m in &mutations {
            mutate(&mut buf, m);
        }
        for max in [FRAME_BYTES_MAX, 512] {
            if let Ok(Some((_, used))) = decode_frame(&buf, max) {
                prop_assert!(used <= buf.len() && used <= max);
                prop_assert!(crc_matches(&buf[..used]));
            }
        }
    }

    #[test]
    fn length_past_the_max_fails_at_once(
        max in 20usize..=FRAME_BYTES_MAX,
        excess in 1u32..1_000_000,
    ) {
        let length = (max - LENGTH_FIELD_BYTES) as u32 + excess;
        let err = decode_frame(&length.to_le_bytes(), max).unwrap_err();
        prop_assert!(
            matches!(err, ProtoError::FrameTooLarge { .. }),
            "unexpected error {:?}",
            err
        );
        prop_assert_eq!(err.error_code(), ErrorCode::BadFrame);
    }
}
