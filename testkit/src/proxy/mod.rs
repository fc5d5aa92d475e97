//! [`FaultProxy`]: a TCP proxy on loopback that injects network faults
//! between a client and a server, switchable at run time.

mod fault_proxy;
mod listener;
mod mode;
mod relay;

pub use fault_proxy::FaultProxy;
pub use mode::FaultMode;
