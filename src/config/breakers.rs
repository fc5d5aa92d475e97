//! A route's breaker in the file: a preset plus the fields to change, with trip rules that
//! can be switched `"off"`.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::breaker::{BreakerConfig, OpenDuration, SlidingWindow};
use crate::route::{Route, RouteConfig};

/// A route's breaker: a preset (the route's own unless named) with fields overridden.
///
/// A rule is switched off with `"off"`: `failure_rate = "off"`.
///
/// ```
/// use protected_pool::config::{BreakerSettings, Rule};
/// use protected_pool::Route;
///
/// let settings = BreakerSettings {
///     preset: Some(Route::Read),
///     consecutive_failures: Some(Rule::Off),
///     failure_rate: Some(Rule::At(0.25)),
///     ..BreakerSettings::default()
/// };
/// let breaker = settings.resolve(Route::Auth);
/// assert_eq!(breaker.consecutive_failures, None);
/// assert_eq!(breaker.failure_rate, Some(0.25));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// The preset to start from: `read`, `write` or `auth` (default: the route's).
    pub preset: Option<Route>,
    /// See [`BreakerConfig::consecutive_failures`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<Rule<u32>>,
    /// See [`BreakerConfig::failure_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<Rule<f64>>,
    /// See [`BreakerConfig::slow_call_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_call_rate: Option<Rule<f64>>,
    /// See [`BreakerConfig::slow_call_duration`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub slow_call_duration: Option<Duration>,
    /// See [`BreakerConfig::window`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<SlidingWindow>,
    /// See [`BreakerConfig::minimum_calls`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_calls: Option<u32>,
    /// Fields of [`BreakerConfig::open`].
    pub open: OpenSettings,
    /// See [`BreakerConfig::half_open_max_calls`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_max_calls: Option<u32>,
    /// See [`BreakerConfig::success_threshold`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
    /// See [`BreakerConfig::max_wait_in_half_open`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_wait_in_half_open: Option<Duration>,
}

/// Overrides of a preset's open duration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenSettings {
    /// First open duration.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub base: Option<Duration>,
    /// Growth per re-open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Longest open duration.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max: Option<Duration>,
    /// Random fraction added or taken off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
}

impl BreakerSettings {
    /// The preset with the overrides applied (not validated).
    pub fn resolve(&self, route: Route) -> BreakerConfig {
        let preset = RouteConfig::for_route(self.preset.unwrap_or(route)).breaker;
        let open = &self.open;
        BreakerConfig {
            consecutive_failures: Rule::apply(
                self.consecutive_failures,
                preset.consecutive_failures,
            ),
            failure_rate: Rule::apply(self.failure_rate, preset.failure_rate),
            slow_call_rate: Rule::apply(self.slow_call_rate, preset.slow_call_rate),
            slow_call_duration: self.slow_call_duration.unwrap_or(preset.slow_call_duration),
            window: self.window.unwrap_or(preset.window),
            minimum_calls: self.minimum_calls.unwrap_or(preset.minimum_calls),
            open: OpenDuration {
                base: open.base.unwrap_or(preset.open.base),
                multiplier: open.multiplier.unwrap_or(preset.open.multiplier),
                max: open.max.unwrap_or(preset.open.max),
                jitter: open.jitter.unwrap_or(preset.open.jitter),
            },
            half_open_max_calls: self
                .half_open_max_calls
                .unwrap_or(preset.half_open_max_calls),
            success_threshold: self.success_threshold.unwrap_or(preset.success_threshold),
            max_wait_in_half_open: self
                .max_wait_in_half_open
                .unwrap_or(preset.max_wait_in_half_open),
        }
    }
}

/// An optional trip rule's setting: a threshold, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule<T> {
    /// The rule is switched off.
    Off,
    /// The rule's threshold.
    At(T),
}

impl<T: Copy> Rule<T> {
    fn apply(setting: Option<Self>, preset: Option<T>) -> Option<T> {
        match setting {
            None => preset,
            Some(Self::Off) => None,
            Some(Self::At(value)) => Some(value),
        }
    }
}

impl<T: Serialize> Serialize for Rule<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Off => serializer.serialize_str("off"),
            Self::At(value) => value.serialize(serializer),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for f64 {}
}

/// A number type a [`Rule`] can hold: `u32` (a count of calls) or `f64` (a rate).
///
/// Sealed: the breaker's rules have no other thresholds to hold.
pub trait RuleValue: Sized + sealed::Sealed {
    #[doc(hidden)]
    fn from_u64(value: u64) -> Option<Self>;
    #[doc(hidden)]
    fn from_f64(value: f64) -> Option<Self>;
    #[doc(hidden)]
    const EXPECTED: &'static str;
}

impl RuleValue for u32 {
    fn from_u64(value: u64) -> Option<Self> {
        u32::try_from(value).ok()
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    const EXPECTED: &'static str = "a whole number of calls or \"off\"";
}

impl RuleValue for f64 {
    fn from_u64(value: u64) -> Option<Self> {
        Some(value as f64)
    }
    fn from_f64(value: f64) -> Option<Self> {
        Some(value)
    }
    const EXPECTED: &'static str = "a rate between 0 and 1 or \"off\"";
}

impl<'de, T: RuleValue> Deserialize<'de> for Rule<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RuleVisitor<T>(PhantomData<T>);

        impl<T: RuleValue> Visitor<'_> for RuleVisitor<T> {
            type Value = Rule<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(T::EXPECTED)
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Rule<T>, E> {
                T::from_u64(value)
                    .map(Rule::At)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Unsigned(value), &self))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Rule<T>, E> {
                match u64::try_from(value) {
                    Ok(value) => self.visit_u64(value),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(value), &self)),
                }
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Rule<T>, E> {
                T::from_f64(value)
                    .map(Rule::At)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Float(value), &self))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Rule<T>, E> {
                if value == "off" {
                    Ok(Rule::Off)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(value), &self))
                }
            }
        }

        deserializer.deserialize_any(RuleVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use crate::PoolConfig;
    use crate::breaker::BreakerConfig;
    use crate::route::Route;
    use std::time::Duration;

    #[test]
    fn overrides_apply_on_the_named_preset_and_off_switches_a_rule_off() {
        let config = PoolConfig::from_toml(
            r#"
            [breakers.auth]
            preset = "read"
            consecutive_failures = "off"
            failure_rate = 0.25
            open = { base = "2s" }
            "#,
        )
        .unwrap();
        let auth = config.breaker(Route::Auth);
        let read = BreakerConfig::read();
        assert_eq!(auth.consecutive_failures, None);
        assert_eq!(auth.failure_rate, Some(0.25));
        assert_eq!(auth.open.base, Duration::from_secs(2));
        assert_eq!(auth.open.max, read.open.max);
        assert_eq!(auth.window, read.window);
    }
}
