//! ggml tensor types (names and block layouts) and llama.cpp file-type labels.

use std::borrow::Cow;
use std::fmt;

/// A ggml tensor element type, by the numeric id stored in the file.
///
/// Ids this crate does not know are kept as numbers: they parse, they are named
/// `type N`, and only size checks refuse them (their block layout is unknown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

/// How a type packs elements: `elements` values are stored in `bytes` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Elements per block (1 for plain float types).
    pub elements: u64,
    /// Bytes per block.
    pub bytes: u64,
}

/// (id, name, elements per block, bytes per block), from ggml's `type_traits`.
const KNOWN_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (30, "BF16", 1, 2),
];

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q8_1: Self = Self(9);
    pub const Q2_K: Self = Self(10);
    pub const Q3_K: Self = Self(11);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const Q8_K: Self = Self(15);
    pub const BF16: Self = Self(30);

    fn known(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        KNOWN_TYPES.iter().find(|(id, ..)| *id == self.0)
    }

    /// The ggml name (`Q4_K`), or `type N` for ids this crate does not know.
    pub fn name(self) -> Cow<'static, str> {
        match self.known() {
            Some((_, name, ..)) => Cow::Borrowed(name),
            None => Cow::Owned(format!("type {}", self.0)),
        }
    }

    /// The block layout, for the types listed above.
    pub fn block_layout(self) -> Option<BlockLayout> {
        self.known()
            .map(|&(_, _, elements, bytes)| BlockLayout { elements, bytes })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The label of a `general.file_type` value (llama.cpp's `llama_ftype`), which numbers
/// file types differently from tensor types: 7 is Q8_0 here, 8 is Q5_0.
pub fn file_type_label(file_type: u64) -> Cow<'static, str> {
    let label = match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_1_SOME_F16",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        other => return Cow::Owned(format!("file_type {other}")),
    };
    Cow::Borrowed(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_types_have_names_and_layouts() {
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(
            GgmlType::Q6_K.block_layout(),
            Some(BlockLayout {
                elements: 256,
                bytes: 210
            })
        );
        assert_eq!(GgmlType::BF16.to_string(), "BF16");
    }

    #[test]
    fn unknown_types_are_named_by_number_and_have_no_layout() {
        assert_eq!(GgmlType(23).name(), "type 23");
        assert_eq!(GgmlType(23).block_layout(), None);
    }

    #[test]
    fn file_type_numbers_differ_from_tensor_type_numbers() {
        assert_eq!(file_type_label(7), "Q8_0");
        assert_eq!(file_type_label(15), "Q4_K_M");
        assert_eq!(file_type_label(99), "file_type 99");
    }
}
