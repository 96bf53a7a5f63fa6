use super::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

fn run(t: GgmlType, block: &[u8]) -> Vec<f32> {
    let (elems, bytes) = t.block();
    assert_eq!(block.len(), bytes);
    let mut y = vec![f32::NAN; elems];
    t.dequantize(block, &mut y);
    y
}

#[test]
fn q8_0_is_signed_bytes_times_the_scale() {
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&h(0.5));
    b[2] = (-3i8) as u8;
    b[5] = 127;
    let y = run(GgmlType::Q8_0, &b);
    assert_eq!((y[0], y[1], y[3]), (-1.5, 0.0, 63.5));
}

#[test]
fn q4_0_low_nibbles_come_first_and_are_offset_by_8() {
    let mut b = vec![0x88u8; 18];
    b[..2].copy_from_slice(&h(2.0));
    b[2] = 0x9A;
    let y = run(GgmlType::Q4_0, &b);
    assert_eq!((y[0], y[16], y[1], y[17]), (4.0, 2.0, 0.0, 0.0));
}

#[test]
fn q4_1_adds_the_min() {
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&h(0.5));
    b[2..4].copy_from_slice(&h(-1.0));
    b[4 + 3] = 0x2F;
    let y = run(GgmlType::Q4_1, &b);
    assert_eq!((y[3], y[19], y[0]), (6.5, 0.0, -1.0));
}

/// Q4_K/Q5_K scales: group 0 has scale 3 and min 2 (6-bit form); group 5 has scale 17 and
/// min 34, its two high bits taken from bytes 1 and 5.
fn k4_head(b: &mut [u8]) {
    b[..2].copy_from_slice(&h(1.0));
    b[2..4].copy_from_slice(&h(0.5));
    let s = &mut b[4..16];
    s[0] = 3;
    s[4] = 2;
    s[9] = 0x21;
    s[1] = 0x40;
    s[5] = 0x80;
}

#[test]
fn q4_k_unpacks_six_bit_scales_and_mins() {
    let mut b = vec![0u8; 144];
    k4_head(&mut b);
    b[16] = 0x05; // element 0: group 0, low nibble
    b[16 + 64 + 1] = 0x70; // element 161: group 5, high nibble
    let y = run(GgmlType::Q4K, &b);
    assert_eq!(y[0], 3.0 * 5.0 - 0.5 * 2.0);
    assert_eq!(y[1], -1.0);
    assert_eq!(y[161], 17.0 * 7.0 - 0.5 * 34.0);
    // Group 1 (elements 32..64) has scale 0 and min 0 (byte 5's low bits).
    assert_eq!(y[40], 0.0);
}

#[test]
fn q5_k_takes_the_fifth_bit_from_qh() {
    let mut b = vec![0u8; 176];
    k4_head(&mut b);
    b[16] = 0x01; // qh[0] bit 0: element 0
    b[17] = 0x20; // qh[1] bit 5: element 161 (part 2, high nibbles)
    b[48] = 0x05;
    b[48 + 64 + 1] = 0x70;
    let y = run(GgmlType::Q5K, &b);
    assert_eq!(y[0], 3.0 * 21.0 - 1.0);
    assert_eq!(y[161], 17.0 * 23.0 - 17.0);
    assert_eq!(y[1], -1.0);
}

#[test]
fn q6_k_combines_low_and_high_bits_with_signed_scales() {
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&h(0.25));
    let (ql, rest) = b.split_at_mut(128);
    let (qh, sc) = rest.split_at_mut(64);
    ql[0] = 0x13; // element 0 low nibble 3, element 64 low nibble... (ql[l]>>4 is element 64)
    qh[0] = 0b1000_0001; // element 0: high bits 1; element 96: high bits 2
    sc[0] = 2;
    sc[1] = 3; // elements 16..32
    sc[4] = (-4i8) as u8; // elements 64..80
    sc[6] = 1; // elements 96..112
    ql[96] = 0xF0; // half 1, element 128 + 96: low bits 15
    qh[32] = 0xC0; // and high bits 3
    sc[14] = 1;
    let y = run(GgmlType::Q6K, &b);
    assert_eq!(y[0], 0.25 * 2.0 * (19.0 - 32.0));
    assert_eq!(y[64], 0.25 * -4.0 * (1.0 - 32.0));
    assert_eq!(y[96], 0.25 * 1.0 * (32.0 - 32.0));
    assert_eq!(y[17], 0.25 * 3.0 * -32.0);
    assert_eq!(y[224], 0.25 * 63.0 - 0.25 * 32.0);
}

#[test]
fn float_types_and_sizes() {
    let mut y = [0.0f32; 2];
    GgmlType::F16.dequantize(&[h(1.5), h(-2.0)].concat(), &mut y);
    assert_eq!(y, [1.5, -2.0]);
    GgmlType::Bf16.dequantize(&[0x80, 0x3f, 0x00, 0xc0], &mut y);
    assert_eq!(y, [1.0, -2.0]);
    assert_eq!(GgmlType::Q4K.bytes_of(512), Some(288));
    assert_eq!(GgmlType::Q8_0.bytes_of(33), None);
    assert_eq!(GgmlType::from_id(6), None);
    assert_eq!(GgmlType::name_of(6), "Q5_0");
}

/// One pseudo-random block of each quantized type against gguf-py's reference dequantizer
/// (`scripts/golden/make_dequant_golden.py`): equal within f32 reassociation (1e-5 relative).
#[test]
fn blocks_match_the_gguf_py_reference() {
    let text = include_str!("../../../tests/golden/gguf/dequant.json");
    let doc: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let t = GgmlType::from_id(case["id"].as_u64().unwrap() as u32).unwrap();
        let hex = case["block"].as_str().unwrap();
        let block: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = run(t, &block);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{name} element {i}: {g} vs gguf-py {w}"
            );
        }
    }
}
