//! QEMU's ThrottleLimits (qapi/block-core.json): six buckets, bytes and
//! operations per second, total or by direction, each with an optional
//! burst rate and burst length, plus `iops-size`. Validation follows
//! QEMU's rules, in QEMU's order and words, so a script that gets an error
//! from qemu-storage-daemon gets the same one here.

use serde_json::{json, Map, Value};

use crate::error::Error;

/// QEMU's THROTTLE_VALUE_MAX: no rate or burst above this.
const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The buckets, in QEMU's order (which is also the order of validation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    OpsTotal = 3,
    OpsRead = 4,
    OpsWrite = 5,
}

pub(super) const KINDS: [Kind; 6] = [
    Kind::BpsTotal,
    Kind::BpsRead,
    Kind::BpsWrite,
    Kind::OpsTotal,
    Kind::OpsRead,
    Kind::OpsWrite,
];

impl Kind {
    /// The ThrottleLimits member of the bucket's rate (`bps-total`).
    fn member(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps-total",
            Kind::BpsRead => "bps-read",
            Kind::BpsWrite => "bps-write",
            Kind::OpsTotal => "iops-total",
            Kind::OpsRead => "iops-read",
            Kind::OpsWrite => "iops-write",
        }
    }
}

/// One bucket's configuration: a rate (0: no limit), a burst rate (0:
/// none) and how many seconds a burst may last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct BucketLimit {
    pub(super) avg: u64,
    pub(super) max: u64,
    pub(super) burst_length: u64,
}

impl Default for BucketLimit {
    fn default() -> Self {
        BucketLimit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A throttle group's limits: no limit at all by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub(super) buckets: [BucketLimit; 6],
    /// `iops-size`: a request of more bytes counts as several operations.
    pub(super) op_size: u64,
}

/// A QAPI `int` given as a JSON number or (QEMU's dotted command-line
/// syntax) a string. A negative one becomes a huge unsigned value, which
/// the range check then refuses, as QEMU's does.
fn int(name: &str, v: &Value) -> Result<u64, Error> {
    let n = match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
        Value::String(s) => s
            .parse::<u64>()
            .ok()
            .or_else(|| s.parse::<i64>().ok().map(|i| i as u64)),
        _ => None,
    };
    n.ok_or_else(|| {
        Error::invalid(format!(
            "Invalid parameter type for '{name}', expected: integer"
        ))
    })
}

impl Limits {
    /// Whether any rate is set (QEMU's throttle_enabled).
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg > 0)
    }

    /// These limits with the members of `update` (a ThrottleLimits object)
    /// changed and the others kept (QEMU's throttle_limits_to_config);
    /// the result is validated as a whole. `prefix` names the object in
    /// messages (`limits.`).
    pub fn updated(&self, update: Map<String, Value>) -> Result<Limits, Error> {
        self.updated_in("limits.", update)
    }

    fn updated_in(&self, prefix: &str, update: Map<String, Value>) -> Result<Limits, Error> {
        let mut l = self.clone();
        let mut lengths = Vec::new();
        for (key, v) in &update {
            let name = format!("{prefix}{key}");
            if key == "iops-size" {
                l.op_size = int(&name, v)?;
                continue;
            }
            let (kind, field) = KINDS
                .iter()
                .find_map(|k| {
                    let m = k.member();
                    if key == m {
                        Some((*k, 0))
                    } else if key.strip_prefix(m) == Some("-max") {
                        Some((*k, 1))
                    } else if key.strip_prefix(m) == Some("-max-length") {
                        Some((*k, 2))
                    } else {
                        None
                    }
                })
                .ok_or_else(|| Error::invalid(format!("Parameter '{name}' is unexpected")))?;
            let n = int(&name, v)?;
            let b = &mut l.buckets[kind as usize];
            match field {
                0 => b.avg = n,
                1 => b.max = n,
                _ => lengths.push((kind, key.clone(), n)),
            }
        }
        // Lengths are checked in bucket order (bps-total, bps-read, ...,
        // iops-write), after every rate is in place, before the whole is
        // validated.
        lengths.sort_by_key(|(k, _, _)| *k as usize);
        for (kind, key, n) in lengths {
            if n > u32::MAX as u64 && (n as i64) >= 0 {
                return Err(Error::invalid(format!(
                    "{key} value must be in the range [0, {}]",
                    u32::MAX
                )));
            }
            l.buckets[kind as usize].burst_length = n;
        }
        l.validate()?;
        Ok(l)
    }

    /// `object-add qom-type=throttle-group`'s properties (all but `id`):
    /// `limits`, and the unstable flat `x-` aliases of its members.
    pub fn from_properties(props: Map<String, Value>) -> Result<Limits, Error> {
        let mut limits = Limits::default();
        let mut flat = Map::new();
        for (key, v) in props {
            if key == "limits" {
                let Value::Object(map) = v else {
                    return Err(Error::invalid(
                        "Invalid parameter type for 'limits', expected: object",
                    ));
                };
                limits = limits.updated(map)?;
            } else if let Some(member) = key.strip_prefix("x-") {
                let n = int(&key, &v)?;
                if (n as i64) < 0 {
                    return Err(Error::invalid("Property values cannot be negative"));
                }
                if member.ends_with("-max-length") && n > u32::MAX as u64 {
                    return Err(Error::invalid(format!(
                        "{key} value must be in therange [0, {}]",
                        u32::MAX
                    )));
                }
                flat.insert(member.to_string(), json!(n));
            } else {
                return Err(Error::invalid(format!("Parameter '{key}' is unexpected")));
            }
        }
        limits.updated_in("x-", flat)
    }

    /// QEMU's throttle_is_valid, rule by rule.
    fn validate(&self) -> Result<(), Error> {
        let b = |k: Kind| self.buckets[k as usize];
        let conflict = |total: Kind, read: Kind, write: Kind, f: fn(BucketLimit) -> u64| {
            f(b(total)) != 0 && (f(b(read)) != 0 || f(b(write)) != 0)
        };
        let avg = |x: BucketLimit| x.avg;
        let max = |x: BucketLimit| x.max;
        if conflict(Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite, avg)
            || conflict(Kind::OpsTotal, Kind::OpsRead, Kind::OpsWrite, avg)
            || conflict(Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite, max)
            || conflict(Kind::OpsTotal, Kind::OpsRead, Kind::OpsWrite, max)
        {
            return Err(Error::invalid(
                "bps/iops/max total values and read/write values cannot be used at the same time",
            ));
        }
        if self.op_size != 0
            && [Kind::OpsTotal, Kind::OpsRead, Kind::OpsWrite]
                .iter()
                .all(|k| b(*k).avg == 0)
        {
            return Err(Error::invalid("iops size requires an iops value to be set"));
        }
        for k in KINDS {
            let x = b(k);
            if x.avg > VALUE_MAX || x.max > VALUE_MAX {
                return Err(Error::invalid(format!(
                    "bps/iops/max values must be within [0, {VALUE_MAX}]"
                )));
            }
            if x.burst_length == 0 {
                return Err(Error::invalid("the burst length cannot be 0"));
            }
            if x.burst_length > 1 && x.max == 0 {
                return Err(Error::invalid("burst length set without burst rate"));
            }
            if x.max != 0 && x.burst_length > VALUE_MAX / x.max {
                return Err(Error::invalid("burst length too high for this burst rate"));
            }
            if x.max != 0 && x.avg == 0 {
                return Err(Error::invalid(
                    "bps_max/iops_max require corresponding bps/iops values",
                ));
            }
            if x.max != 0 && x.max < x.avg {
                return Err(Error::invalid(
                    "bps_max/iops_max cannot be lower than bps/iops",
                ));
            }
        }
        Ok(())
    }

    /// All 19 members, as `qom-get ID limits` returns them.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for k in KINDS {
            let b = self.buckets[k as usize];
            m.insert(k.member().to_string(), json!(b.avg));
            m.insert(format!("{}-max", k.member()), json!(b.max));
            m.insert(format!("{}-max-length", k.member()), json!(b.burst_length));
        }
        m.insert("iops-size".into(), json!(self.op_size));
        Value::Object(m)
    }

    /// One flat member (`qom-get ID x-iops-total`), if it is one.
    pub fn member(&self, name: &str) -> Option<u64> {
        self.to_json().get(name).and_then(Value::as_u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test input is an object"),
        }
    }

    fn err(props: Value) -> String {
        Limits::from_properties(obj(props))
            .unwrap_err()
            .message()
            .to_string()
    }

    #[test]
    fn defaults_and_partial_updates() {
        let l = Limits::from_properties(obj(json!({"limits": {"iops-total": 1000}}))).unwrap();
        assert!(l.enabled());
        let j = l.to_json();
        assert_eq!(j["iops-total"], 1000);
        assert_eq!(j["bps-read-max-length"], 1);
        assert_eq!(j.as_object().unwrap().len(), 19);
        // A partial update keeps what it does not name.
        let l2 = l
            .updated(obj(json!({"bps-read": "4096", "iops-total-max": 2000})))
            .unwrap();
        assert_eq!(l2.to_json()["iops-total"], 1000);
        assert_eq!(l2.to_json()["bps-read"], 4096);
        // No limits at all is a valid group.
        assert!(!Limits::from_properties(Map::new()).unwrap().enabled());
        // The flat aliases.
        let l3 = Limits::from_properties(obj(json!({"x-iops-read": "10"}))).unwrap();
        assert_eq!(l3.member("iops-read"), Some(10));
    }

    #[test]
    fn qemus_validation_rules_and_words() {
        assert_eq!(
            err(json!({"limits": {"iops-total": 10, "iops-read": 5}})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(json!({"limits": {"iops-size": 4096}})),
            "iops size requires an iops value to be set"
        );
        assert_eq!(
            err(json!({"limits": {"bps-total": 1_000_000_000_000_001u64}})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total": -1}})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total": 10, "iops-total-max-length": 0}})),
            "the burst length cannot be 0"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total": 10, "iops-total-max-length": 5}})),
            "burst length set without burst rate"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total-max": 10}})),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total": 10, "iops-total-max": 5}})),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert_eq!(
            err(
                json!({"limits": {"iops-total": 10, "iops-total-max": 1_000_000_000_000_000u64,
                                   "iops-total-max-length": 2}})
            ),
            "burst length too high for this burst rate"
        );
        assert_eq!(
            err(json!({"limits": {"bps-read-max-length": 4_294_967_296u64}})),
            "bps-read-max-length value must be in the range [0, 4294967295]"
        );
        assert_eq!(
            err(json!({"limits": {"iops-foo": 1}})),
            "Parameter 'limits.iops-foo' is unexpected"
        );
        assert_eq!(
            err(json!({"limits": {"iops-total": "many"}})),
            "Invalid parameter type for 'limits.iops-total', expected: integer"
        );
        assert_eq!(
            err(json!({"x-iops-total": -5})),
            "Property values cannot be negative"
        );
        assert_eq!(
            err(json!({"x-iops-total-max-length": 4_294_967_296u64})),
            "x-iops-total-max-length value must be in therange [0, 4294967295]"
        );
        assert_eq!(err(json!({"bogus": 1})), "Parameter 'bogus' is unexpected");
    }
}
