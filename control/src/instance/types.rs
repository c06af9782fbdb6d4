//! Instance types: a family, a generation and a size, as EC2 names them
//! (`c5.large`). `k` is general purpose (1 vCPU per 512 MiB above nano),
//! `c` compute optimized (twice the vCPUs), `m` memory optimized (twice the
//! memory).
use std::fmt;

/// One entry of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceType {
    /// FAMILY GENERATION.SIZE, as `kiln run --type` takes it.
    pub name: &'static str,
    /// The VM's vCPUs.
    pub vcpus: u8,
    /// The VM's memory.
    pub memory_mib: u32,
}

/// Every type, smallest first within a family.
pub const CATALOG: &[InstanceType] = &[
    InstanceType {
        name: "k1.nano",
        vcpus: 1,
        memory_mib: 128,
    },
    InstanceType {
        name: "k1.micro",
        vcpus: 1,
        memory_mib: 256,
    },
    InstanceType {
        name: "k1.small",
        vcpus: 1,
        memory_mib: 512,
    },
    InstanceType {
        name: "k1.medium",
        vcpus: 2,
        memory_mib: 1024,
    },
    InstanceType {
        name: "k1.large",
        vcpus: 2,
        memory_mib: 2048,
    },
    InstanceType {
        name: "c1.medium",
        vcpus: 2,
        memory_mib: 512,
    },
    InstanceType {
        name: "c1.large",
        vcpus: 4,
        memory_mib: 1024,
    },
    InstanceType {
        name: "m1.medium",
        vcpus: 1,
        memory_mib: 2048,
    },
    InstanceType {
        name: "m1.large",
        vcpus: 2,
        memory_mib: 4096,
    },
];

/// The type `kiln run` uses when given neither a type nor a size.
pub const DEFAULT: &str = "k1.nano";

/// Why a type name is not in the catalog.
#[derive(Debug, thiserror::Error)]
#[error("unknown instance type {0:?}; `kiln types` lists them")]
pub struct UnknownType(pub String);

impl InstanceType {
    /// The catalog entry named `name`.
    pub fn find(name: &str) -> Result<InstanceType, UnknownType> {
        CATALOG
            .iter()
            .copied()
            .find(|t| t.name == name)
            .ok_or_else(|| UnknownType(name.to_string()))
    }
}

impl fmt::Display for InstanceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<10} {:>2} vCPU {:>5} MiB",
            self.name, self.vcpus, self.memory_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_family_generation_size_and_unique() {
        for (i, t) in CATALOG.iter().enumerate() {
            let (family, size) = t.name.split_once('.').unwrap();
            assert!(family.ends_with('1') && !size.is_empty(), "{}", t.name);
            assert!(
                CATALOG[i + 1..].iter().all(|o| o.name != t.name),
                "{}",
                t.name
            );
        }
        assert_eq!(InstanceType::find(DEFAULT).unwrap().memory_mib, 128);
        let err = InstanceType::find("t2.micro").unwrap_err().to_string();
        assert!(err.contains("\"t2.micro\""), "{err}");
    }
}
