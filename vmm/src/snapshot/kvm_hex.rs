//! Serde for KVM's plain-data structs (`kvm_regs`, `kvm_xsave`, `kvm_lapic_state`, …) as one
//! hex string each. kvm-bindings serialises them as their bytes, which JSON writes as an array
//! of numbers: ~27 KB of them per vCPU, and parsing those was ~0.1 ms of every restore (about
//! a sixth of a standby's request → vCPUs resumed). Hex is the same bytes, plain data still,
//! and decodes in a few microseconds.
//!
//! Decoding is strict: a string that is not hex or not exactly the struct's size is an error
//! (kvm-bindings itself would zero-fill a short one).

use serde::de::value::BytesDeserializer;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serializer};
use zerocopy::{Immutable, IntoBytes};

/// The bytes of one struct, checked to be exactly its size, back into it through
/// kvm-bindings' own (byte-wise) deserialiser.
fn from_bytes<'de, T: DeserializeOwned, D: Deserializer<'de>>(bytes: &[u8]) -> Result<T, D::Error> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != size {
        return Err(D::Error::custom(format!(
            "{} is {size} bytes, the snapshot holds {}",
            std::any::type_name::<T>(),
            bytes.len()
        )));
    }
    T::deserialize(BytesDeserializer::<D::Error>::new(bytes))
}

fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
    hex::decode(text.as_bytes()).map_err(D::Error::custom)
}

pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(v.as_bytes()))
}

pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    from_bytes::<T, D>(&decode(d)?)
}

/// `Option<T>`: null or one hex string.
pub mod option {
    use super::*;

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        match <Option<std::borrow::Cow<'de, str>>>::deserialize(d)? {
            None => Ok(None),
            Some(text) => {
                let bytes = hex::decode(text.as_bytes()).map_err(D::Error::custom)?;
                from_bytes::<T, D>(&bytes).map(Some)
            }
        }
    }
}

/// Raw bytes (`Vec<u8>`) as one hex string.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        decode(d)
    }
}

/// `Vec<T>`: the structs' bytes back to back in one hex string.
pub mod vec {
    use super::*;

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v.as_bytes()))
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        let bytes = decode(d)?;
        let size = std::mem::size_of::<T>();
        if size == 0 || bytes.len() % size != 0 {
            return Err(D::Error::custom(format!(
                "{} bytes are not a whole number of {} ({size} bytes each)",
                bytes.len(),
                std::any::type_name::<T>()
            )));
        }
        bytes
            .chunks_exact(size)
            .map(|c| from_bytes::<T, D>(c))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid_entry2, kvm_regs};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct S {
        #[serde(with = "super")]
        regs: kvm_regs,
        #[serde(with = "super::option")]
        none: Option<kvm_regs>,
        #[serde(with = "super::vec")]
        cpuid: Vec<kvm_cpuid_entry2>,
    }

    #[test]
    fn structs_round_trip_as_hex_and_wrong_sizes_are_refused() {
        let s = S {
            regs: kvm_regs {
                rip: 0x1234_5678,
                rflags: 2,
                ..Default::default()
            },
            none: None,
            cpuid: vec![
                kvm_cpuid_entry2 {
                    function: 7,
                    ebx: 0xdead_beef,
                    ..Default::default()
                };
                3
            ],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains('['), "{json}");
        let back: S = serde_json::from_str(&json).unwrap();
        assert_eq!(back.regs.rip, 0x1234_5678);
        assert!(back.none.is_none());
        assert_eq!(back.cpuid.len(), 3);
        assert_eq!(back.cpuid[2].ebx, 0xdead_beef);

        // One byte short of kvm_regs, and a cpuid list with half an entry.
        let regs_hex = hex::encode(zerocopy::IntoBytes::as_bytes(&s.regs));
        let short = json.replace(&regs_hex, &regs_hex[2..]);
        assert!(serde_json::from_str::<S>(&short).is_err());
        let cpuid_hex = hex::encode(zerocopy::IntoBytes::as_bytes(&s.cpuid[..]));
        let ragged = json.replace(&cpuid_hex, &cpuid_hex[..cpuid_hex.len() - 8]);
        assert!(serde_json::from_str::<S>(&ragged).is_err());
        assert!(serde_json::from_str::<S>(&json.replace(&regs_hex, "zz")).is_err());
    }
}
