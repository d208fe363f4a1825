//! VMBus for bare-metal Rust kernels.
//!
//! This crate holds everything about Hyper-V's VMBus that does not touch a register: the Top-Level Functional
//! Specification definitions ([`hv`]), the VMBus control protocol ([`protocol`]), the ring buffers ([`ring`]) and
//! the guest side of the bus ([`client`]), the host side ([`server`]), and the Windows KMCL API model drivers are
//! written against ([`kmcl`]: NTSTATUS values, handle tables).
//! Hardware is reached only through small traits, so the whole crate runs and is tested on the host.
//!
//! The facts it implements are collected, with their sources, in the project's reference notes
//! (`hyperv-vmbus.md`, `kmcl-api.md`, `dynamic-memory.md`).
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod hv;
pub mod protocol;
pub mod ring;
pub mod client;
pub mod channel;
pub mod memory;
pub mod server;
pub mod kmcl;
pub mod dm;
pub mod ic;
pub mod drivers;
