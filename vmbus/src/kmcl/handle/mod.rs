//! Handle tables: per-context tables of reference-counted objects, the kernel table, and
//! `VmbConvertVmbusHandleToKernelHandle`.
//!
//! Implements issue 6 §7 and `kmcl-api.md`, server-only methods (`VmbConvertVmbusHandleToKernelHandle`,
//! `VmbServerChannelInitSetVmbusHandle`); the seed page is `seeds/VmbConvertVmbusHandleToKernelHandle.md`.
//!
//! # The model
//! On Windows a VMBus server is told which child partition to offer a channel to through a handle: the VM worker
//! process opens a VMBus handle in its own handle table, a kernel driver running in that process turns it into a
//! kernel handle (`VmbConvertVmbusHandleToKernelHandle`) and gives the kernel handle to
//! `VmbServerChannelInitSetVmbusHandle`. The unikernel keeps that shape with these pieces:
//! - A **context** ([`ContextId`]) is the unikernel's stand-in for a process: a unit that owns handles and can go
//!   away as a whole. [`ContextId::KERNEL`] names the kernel table, which always exists.
//! - A [`HandleTable`] maps handles to objects. It holds one strong reference ([`Arc`]) per handle; looking a handle
//!   up returns another strong reference, so an object lives while any table entry or any borrower holds it, and is
//!   dropped when the last of them lets go — never while a table lock is held.
//! - A handle ([`RawHandle`], typed as [`Handle<T>`], or [`KernelHandle`] for the kernel table) names its context, a
//!   slot and the slot's **generation**. Closing a handle bumps the slot's generation before the slot is reused, so a
//!   stale handle is rejected instead of reaching the slot's next object; a slot whose generation would wrap is
//!   retired for good. A forged handle is accepted only if it equals a live handle of the calling context exactly.
//! - [`Handles`] is the registry: it owns the kernel table, creates and destroys context tables (destroying a context
//!   closes every handle in it) and performs the conversions.
//! - Objects declare their type through [`KernelObject`]; typed look-ups of an object of another type fail with
//!   [`NtStatus::OBJECT_TYPE_MISMATCH`]. Objects whose type says [`KernelObject::IS_VMBUS_HANDLE`] (such as
//!   [`VmbusPartition`]) are VMBus handles: only they can be converted.
//!
//! # Statuses
//! | situation | status |
//! |---|---|
//! | closed handle, stale generation, unknown slot, null or forged handle | [`NtStatus::INVALID_HANDLE`] |
//! | handle of another context than the caller's | [`NtStatus::INVALID_HANDLE`] (it means nothing in the caller's table, as a handle value of another process means nothing on Windows) |
//! | handle looked up or closed in a context that was destroyed | [`NtStatus::INVALID_HANDLE`] (destroying it closed every handle) |
//! | typed look-up of an object of another type; converting a handle that is not a VMBus handle | [`NtStatus::OBJECT_TYPE_MISMATCH`] |
//! | new handle in a context that does not exist (destroyed or never created); destroying it again | [`NtStatus::PROCESS_IS_TERMINATING`] |
//! | destroying the kernel context | [`NtStatus::INVALID_PARAMETER`] |
//! | table full, context ids exhausted | [`NtStatus::INSUFFICIENT_RESOURCES`] |

#[cfg(test)]
mod tests;

use super::status::{NtStatus, Result};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;
use core::hash::{Hash, Hasher};
use core::marker::PhantomData;
use spin::{Mutex, RwLock};

/// How many slots a table has at most unless [`Handles::with_max_handles_per_table`] says otherwise.
pub const DEFAULT_MAX_HANDLES_PER_TABLE: u32 = 1 << 20;

/// An object that handles can refer to: its type name for diagnostics, and whether a handle to it is a VMBus handle.
pub trait KernelObject: Any + Send + Sync {
    /// A short name of the type, reported by [`HandleTable::object_type`].
    const TYPE_NAME: &'static str;

    /// Whether a handle to this object is a VMBus handle, that is one
    /// [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`] converts. Only partition objects (the target of
    /// `VmbServerChannelInitSetVmbusHandle`) should say yes.
    const IS_VMBUS_HANDLE: bool = false;
}

/// A context: the unikernel's equivalent of a Windows process, the owner of one handle table.
///
/// Ids are never reused, so the id of a destroyed context can never name a newer one.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ContextId(u32);

impl ContextId {
    /// The kernel's own context: its table holds the kernel handles and is never destroyed.
    pub const KERNEL: ContextId = ContextId(0);

    /// The id with this number, as it crosses a boundary (a log, a C caller). Whether such a context exists is
    /// checked by every operation that takes one.
    pub const fn from_u32(value: u32) -> ContextId {
        ContextId(value)
    }

    /// The number of this id.
    pub const fn as_u32(self) -> u32 {
        self.0
    }

    /// Whether this is [`ContextId::KERNEL`].
    pub const fn is_kernel(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for ContextId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_kernel() {
            write!(f, "kernel")
        } else {
            write!(f, "context {}", self.0)
        }
    }
}

/// An untyped handle: the context whose table it belongs to, the slot in that table and the slot's generation.
///
/// Any value can be built with [`RawHandle::from_parts`] (it models a handle value arriving from outside); every
/// table operation checks it, so a made-up value is rejected unless it equals a live handle of the calling context.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RawHandle {
    context: ContextId,
    slot: u32,
    generation: u32,
}

impl RawHandle {
    /// The null handle: no table ever hands out generation 0, so it is never valid.
    pub const NULL: RawHandle = RawHandle {
        context: ContextId::KERNEL,
        slot: 0,
        generation: 0,
    };

    /// A handle value from its parts, unchecked (see the type's documentation).
    pub const fn from_parts(context: ContextId, slot: u32, generation: u32) -> RawHandle {
        RawHandle {
            context,
            slot,
            generation,
        }
    }

    /// The context whose table this handle belongs to.
    pub const fn context(self) -> ContextId {
        self.context
    }

    /// The slot index in that table.
    pub const fn slot(self) -> u32 {
        self.slot
    }

    /// The generation of the slot when the handle was created (never 0 for a real handle).
    pub const fn generation(self) -> u32 {
        self.generation
    }

    /// Whether this is a null handle (generation 0).
    pub const fn is_null(self) -> bool {
        self.generation == 0
    }
}

impl fmt::Display for RawHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "handle {}#{} of {}",
            self.slot, self.generation, self.context
        )
    }
}

/// A handle to an object of type `T`: a [`RawHandle`] that remembers what it was created for.
///
/// The type is a promise, not a proof: [`Handle::from_raw`] can attach any type to any raw handle, and a look-up
/// whose object has another type fails with [`NtStatus::OBJECT_TYPE_MISMATCH`].
pub struct Handle<T> {
    raw: RawHandle,
    object_type: PhantomData<fn() -> T>,
}

impl<T> Handle<T> {
    /// The handle `raw`, to be looked up as a `T`.
    pub const fn from_raw(raw: RawHandle) -> Handle<T> {
        Handle {
            raw,
            object_type: PhantomData,
        }
    }

    /// The untyped handle.
    pub const fn raw(self) -> RawHandle {
        self.raw
    }
}

// Manual impls: derives would demand `T: Clone` and so on, although only the raw handle is stored.
impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Handle<T> {}

impl<T> PartialEq for Handle<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl<T> Eq for Handle<T> {}

impl<T> Hash for Handle<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.raw.hash(state);
    }
}

impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle<{}>({:?})", core::any::type_name::<T>(), self.raw)
    }
}

impl<T> From<Handle<T>> for RawHandle {
    fn from(handle: Handle<T>) -> RawHandle {
        handle.raw
    }
}

/// A handle in the kernel table, as [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`] returns it and
/// `VmbServerChannelInitSetVmbusHandle` takes it. The caller closes it with [`Handles::close_kernel_handle`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct KernelHandle(RawHandle);

impl KernelHandle {
    /// `raw` as a kernel handle, or `None` if it belongs to another context than [`ContextId::KERNEL`].
    pub const fn from_raw(raw: RawHandle) -> Option<KernelHandle> {
        if raw.context.is_kernel() {
            Some(KernelHandle(raw))
        } else {
            None
        }
    }

    /// The untyped handle.
    pub const fn raw(self) -> RawHandle {
        self.0
    }
}

impl From<KernelHandle> for RawHandle {
    fn from(handle: KernelHandle) -> RawHandle {
        handle.0
    }
}

/// Identifies a partition (a child VM, or on the unikernel whatever peer a server channel is offered to).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct PartitionId(pub u64);

/// The object a VMBus handle refers to: the partition a server channel is offered to (`kmcl-api.md`,
/// `VmbServerChannelInitSetVmbusHandle`). The only VMBus handle type of this module; the server may define richer
/// ones by implementing [`KernelObject`] with `IS_VMBUS_HANDLE = true`.
#[derive(Debug, PartialEq, Eq)]
pub struct VmbusPartition {
    id: PartitionId,
    name: String,
}

impl VmbusPartition {
    /// A partition object with this id and a name for logs.
    pub fn new(id: PartitionId, name: impl Into<String>) -> VmbusPartition {
        VmbusPartition {
            id,
            name: name.into(),
        }
    }

    /// The partition's id.
    pub fn id(&self) -> PartitionId {
        self.id
    }

    /// The partition's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl KernelObject for VmbusPartition {
    const TYPE_NAME: &'static str = "VmbusPartition";
    const IS_VMBUS_HANDLE: bool = true;
}

/// What a table stores per handle: a strong reference and the facts of the object's type.
#[derive(Clone)]
struct Entry {
    object: Arc<dyn Any + Send + Sync>,
    type_name: &'static str,
    vmbus_handle: bool,
}

impl Entry {
    fn new<T: KernelObject>(object: Arc<T>) -> Entry {
        Entry {
            object,
            type_name: T::TYPE_NAME,
            vmbus_handle: T::IS_VMBUS_HANDLE,
        }
    }

    fn downcast<T: KernelObject>(self) -> Result<Arc<T>> {
        self.object
            .downcast::<T>()
            .map_err(|_| NtStatus::OBJECT_TYPE_MISMATCH)
    }
}

struct Slot {
    /// The generation of the handle the slot holds, or will hand out next if it is free.
    generation: u32,
    entry: Option<Entry>,
}

struct Slots {
    slots: Vec<Slot>,
    /// Free slots, most recently freed last.
    free: Vec<u32>,
    /// Slots holding an entry.
    open: usize,
    /// Set when the context is destroyed: no new handles.
    destroyed: bool,
}

/// The handle table of one context (see the module documentation).
///
/// Every method takes the table's spin lock for a short, bounded time; no object is dropped while it is held.
pub struct HandleTable {
    context: ContextId,
    max_handles: u32,
    slots: Mutex<Slots>,
}

impl HandleTable {
    fn new(context: ContextId, max_handles: u32) -> HandleTable {
        HandleTable {
            context,
            max_handles,
            slots: Mutex::new(Slots {
                slots: Vec::new(),
                free: Vec::new(),
                open: 0,
                destroyed: false,
            }),
        }
    }

    /// The context this table belongs to.
    pub fn context(&self) -> ContextId {
        self.context
    }

    /// How many handles are open.
    pub fn len(&self) -> usize {
        self.slots.lock().open
    }

    /// Whether no handle is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a handle to `object`; the table keeps a strong reference until the handle is closed.
    ///
    /// Fails with [`NtStatus::INSUFFICIENT_RESOURCES`] when the table is full and
    /// [`NtStatus::PROCESS_IS_TERMINATING`] when its context was destroyed.
    pub fn insert<T: KernelObject>(&self, object: Arc<T>) -> Result<Handle<T>> {
        self.insert_entry(Entry::new(object)).map(Handle::from_raw)
    }

    /// The object of `handle` (a new strong reference).
    ///
    /// Fails with [`NtStatus::INVALID_HANDLE`] for a handle that is not open in this table and
    /// [`NtStatus::OBJECT_TYPE_MISMATCH`] when the object is not a `T`.
    pub fn get<T: KernelObject>(&self, handle: Handle<T>) -> Result<Arc<T>> {
        self.entry(handle.raw)?.downcast()
    }

    /// The object of `handle`, untyped (a new strong reference). Fails like [`HandleTable::get`] for a bad handle.
    pub fn get_any(&self, handle: RawHandle) -> Result<Arc<dyn Any + Send + Sync>> {
        Ok(self.entry(handle)?.object)
    }

    /// The [`KernelObject::TYPE_NAME`] of the object of `handle`.
    pub fn object_type(&self, handle: RawHandle) -> Result<&'static str> {
        let slots = self.slots.lock();
        Ok(self.find(&slots, handle)?.type_name)
    }

    /// Opens a second handle in this table to the object of `handle`; both must be closed.
    pub fn duplicate(&self, handle: RawHandle) -> Result<RawHandle> {
        let entry = self.entry(handle)?;
        self.insert_entry(entry)
    }

    /// Closes `handle`: drops the table's reference to its object and makes the handle (and any copy of it) invalid.
    ///
    /// Fails with [`NtStatus::INVALID_HANDLE`] for a handle that is not open in this table, including one closed
    /// before.
    pub fn close(&self, handle: RawHandle) -> Result<()> {
        let entry = {
            let mut slots = self.slots.lock();
            self.find(&slots, handle)?;
            let Slots {
                slots, free, open, ..
            } = &mut *slots;
            let slot = &mut slots[handle.slot as usize];
            let entry = slot.entry.take();
            release_slot(handle.slot, slot, free);
            *open -= 1;
            entry
        };
        // The object may be dropped here, after the lock is released: its destructor may use the table.
        drop(entry);
        Ok(())
    }

    /// Finds the entry of `handle` in the locked slots, or says why there is none.
    fn find<'a>(&self, slots: &'a Slots, handle: RawHandle) -> Result<&'a Entry> {
        if handle.context != self.context || handle.generation == 0 {
            return Err(NtStatus::INVALID_HANDLE);
        }
        match slots.slots.get(handle.slot as usize) {
            Some(Slot {
                generation,
                entry: Some(entry),
            }) if *generation == handle.generation => Ok(entry),
            _ => Err(NtStatus::INVALID_HANDLE),
        }
    }

    /// A copy of the entry of `handle` (one more strong reference).
    fn entry(&self, handle: RawHandle) -> Result<Entry> {
        let slots = self.slots.lock();
        self.find(&slots, handle).cloned()
    }

    fn insert_entry(&self, entry: Entry) -> Result<RawHandle> {
        let placed = {
            let mut guard = self.slots.lock();
            let Slots {
                slots,
                free,
                open,
                destroyed,
            } = &mut *guard;
            if *destroyed {
                Err((NtStatus::PROCESS_IS_TERMINATING, entry))
            } else if let Some(index) = free.pop() {
                let slot = &mut slots[index as usize];
                slot.entry = Some(entry);
                *open += 1;
                Ok(RawHandle {
                    context: self.context,
                    slot: index,
                    generation: slot.generation,
                })
            } else if slots.len() < self.max_handles as usize {
                let index = slots.len() as u32;
                slots.push(Slot {
                    generation: 1,
                    entry: Some(entry),
                });
                *open += 1;
                Ok(RawHandle {
                    context: self.context,
                    slot: index,
                    generation: 1,
                })
            } else {
                Err((NtStatus::INSUFFICIENT_RESOURCES, entry))
            }
        };
        // On failure the entry (maybe the last reference to the object) is dropped here, outside the lock.
        placed.map_err(|(status, _entry)| status)
    }

    /// Closes every handle and refuses new ones; returns how many were closed.
    fn destroy(&self) -> usize {
        let entries: Vec<Entry> = {
            let mut guard = self.slots.lock();
            let Slots {
                slots,
                free,
                open,
                destroyed,
            } = &mut *guard;
            *destroyed = true;
            let mut entries = Vec::with_capacity(*open);
            for (index, slot) in slots.iter_mut().enumerate() {
                if let Some(entry) = slot.entry.take() {
                    entries.push(entry);
                    release_slot(index as u32, slot, free);
                }
            }
            *open = 0;
            entries
        };
        let closed = entries.len();
        drop(entries);
        closed
    }

    /// Test hook: sets the generation of an existing slot (the one it holds, or hands out next if free).
    #[cfg(test)]
    fn set_slot_generation(&self, slot: u32, generation: u32) {
        self.slots.lock().slots[slot as usize].generation = generation;
    }
}

/// Makes a slot whose entry was just taken free for reuse under the next generation, or retires it when the
/// generation is exhausted (so no handle value is ever handed out twice).
fn release_slot(index: u32, slot: &mut Slot, free: &mut Vec<u32>) {
    if let Some(next) = slot.generation.checked_add(1) {
        slot.generation = next;
        free.push(index);
    }
}

impl fmt::Debug for HandleTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandleTable")
            .field("context", &self.context)
            .field("open", &self.len())
            .finish()
    }
}

struct Contexts {
    tables: BTreeMap<ContextId, Arc<HandleTable>>,
    /// The id the next context gets.
    next: u32,
}

/// The registry of handle tables: the kernel table and one table per live context (see the module documentation).
pub struct Handles {
    kernel: Arc<HandleTable>,
    contexts: RwLock<Contexts>,
    max_handles_per_table: u32,
}

impl Default for Handles {
    fn default() -> Self {
        Handles::new()
    }
}

impl fmt::Debug for Handles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handles")
            .field("kernel_handles", &self.kernel.len())
            .field("contexts", &self.context_count())
            .finish()
    }
}

impl Handles {
    /// An empty registry (only the kernel table), each table holding at most [`DEFAULT_MAX_HANDLES_PER_TABLE`].
    pub fn new() -> Handles {
        Handles::with_max_handles_per_table(DEFAULT_MAX_HANDLES_PER_TABLE)
    }

    /// An empty registry whose tables (the kernel's included) hold at most `max_handles` slots each.
    pub fn with_max_handles_per_table(max_handles: u32) -> Handles {
        Handles {
            kernel: Arc::new(HandleTable::new(ContextId::KERNEL, max_handles)),
            contexts: RwLock::new(Contexts {
                tables: BTreeMap::new(),
                next: 1,
            }),
            max_handles_per_table: max_handles,
        }
    }

    /// The kernel table.
    pub fn kernel_table(&self) -> &HandleTable {
        &self.kernel
    }

    /// The table of `context` ([`ContextId::KERNEL`] included); [`NtStatus::PROCESS_IS_TERMINATING`] if the context
    /// does not exist.
    pub fn table(&self, context: ContextId) -> Result<Arc<HandleTable>> {
        if context.is_kernel() {
            return Ok(self.kernel.clone());
        }
        self.contexts
            .read()
            .tables
            .get(&context)
            .cloned()
            .ok_or(NtStatus::PROCESS_IS_TERMINATING)
    }

    /// Creates a context with an empty table. Fails with [`NtStatus::INSUFFICIENT_RESOURCES`] once every id has been
    /// used (ids are never reused).
    pub fn create_context(&self) -> Result<ContextId> {
        let mut contexts = self.contexts.write();
        let id = ContextId(contexts.next);
        contexts.next = contexts
            .next
            .checked_add(1)
            .ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        contexts.tables.insert(
            id,
            Arc::new(HandleTable::new(id, self.max_handles_per_table)),
        );
        Ok(id)
    }

    /// Destroys a context: closes every handle in its table (objects still referenced elsewhere, for example through
    /// a kernel handle, live on) and forgets the id. Returns how many handles were closed.
    ///
    /// Fails with [`NtStatus::INVALID_PARAMETER`] for [`ContextId::KERNEL`] and
    /// [`NtStatus::PROCESS_IS_TERMINATING`] for a context that does not exist.
    pub fn destroy_context(&self, context: ContextId) -> Result<usize> {
        if context.is_kernel() {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        let table = self
            .contexts
            .write()
            .tables
            .remove(&context)
            .ok_or(NtStatus::PROCESS_IS_TERMINATING)?;
        Ok(table.destroy())
    }

    /// How many contexts exist (the kernel's not counted).
    pub fn context_count(&self) -> usize {
        self.contexts.read().tables.len()
    }

    /// How many handles are open in all tables, the kernel's included.
    pub fn open_handles(&self) -> usize {
        let contexts = self.contexts.read();
        self.kernel.len()
            + contexts
                .tables
                .values()
                .map(|table| table.len())
                .sum::<usize>()
    }

    /// Opens a handle to `object` in `context`'s table (see [`HandleTable::insert`]).
    pub fn insert<T: KernelObject>(&self, context: ContextId, object: Arc<T>) -> Result<Handle<T>> {
        self.table(context)?.insert(object)
    }

    /// The object of `handle` as seen from `context` (see [`HandleTable::get`]); [`NtStatus::INVALID_HANDLE`] if
    /// the handle is not open in `context`'s table.
    pub fn get<T: KernelObject>(&self, context: ContextId, handle: Handle<T>) -> Result<Arc<T>> {
        self.lookup_table(context)?.get(handle)
    }

    /// Closes `handle` in `context`'s table (see [`HandleTable::close`]).
    pub fn close(&self, context: ContextId, handle: RawHandle) -> Result<()> {
        self.lookup_table(context)?.close(handle)
    }

    /// Opens a handle in `target` to the object `handle` refers to in `source` (the handle stays open in `source`).
    ///
    /// Fails with [`NtStatus::INVALID_HANDLE`] if `handle` is not open in `source`, and like
    /// [`HandleTable::insert`] if `target` cannot take it.
    pub fn duplicate(
        &self,
        source: ContextId,
        handle: RawHandle,
        target: ContextId,
    ) -> Result<RawHandle> {
        let entry = self.lookup_table(source)?.entry(handle)?;
        self.table(target)?.insert_entry(entry)
    }

    /// `VmbConvertVmbusHandleToKernelHandle`: opens a kernel handle to the object that `vmbus_handle` refers to in
    /// the calling context.
    ///
    /// `vmbus_handle` is interpreted in `calling_context` only — on Windows the function must run in the process
    /// that opened the user-mode handle, and here the caller says which context it runs in. The result is a new
    /// handle in the kernel table that references the same object; the context's handle stays open, either can be
    /// closed first, and the object lives until both are closed. The caller owns the kernel handle and closes it
    /// with [`Handles::close_kernel_handle`], typically after handing it to `VmbServerChannelInitSetVmbusHandle`
    /// (which resolves it with [`Handles::resolve_partition`]).
    ///
    /// Fails with:
    /// - [`NtStatus::INVALID_HANDLE`] if `vmbus_handle` is not open in `calling_context`: closed, stale, forged,
    ///   belonging to another context, or the calling context itself no longer exists;
    /// - [`NtStatus::OBJECT_TYPE_MISMATCH`] if the object is not a VMBus handle ([`KernelObject::IS_VMBUS_HANDLE`]);
    /// - [`NtStatus::INSUFFICIENT_RESOURCES`] if the kernel table is full.
    ///
    /// Called from [`ContextId::KERNEL`] with a kernel handle, it opens a second kernel handle to the same object.
    pub fn vmb_convert_vmbus_handle_to_kernel_handle(
        &self,
        calling_context: ContextId,
        vmbus_handle: RawHandle,
    ) -> Result<KernelHandle> {
        let entry = self.lookup_table(calling_context)?.entry(vmbus_handle)?;
        if !entry.vmbus_handle {
            return Err(NtStatus::OBJECT_TYPE_MISMATCH);
        }
        self.kernel.insert_entry(entry).map(KernelHandle)
    }

    /// Closes a kernel handle, such as one returned by [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`].
    /// Fails with [`NtStatus::INVALID_HANDLE`] if it is not open.
    pub fn close_kernel_handle(&self, kernel_handle: KernelHandle) -> Result<()> {
        self.kernel.close(kernel_handle.0)
    }

    /// The object of a kernel handle as a `T` (a new strong reference): [`NtStatus::INVALID_HANDLE`] if the handle is
    /// not open, [`NtStatus::OBJECT_TYPE_MISMATCH`] if the object is not a `T`.
    pub fn get_kernel<T: KernelObject>(&self, kernel_handle: KernelHandle) -> Result<Arc<T>> {
        self.kernel.get(Handle::from_raw(kernel_handle.0))
    }

    /// The partition a kernel handle refers to: the look-up behind `VmbServerChannelInitSetVmbusHandle`, which
    /// chooses the partition a server channel is offered to. Fails like [`Handles::get_kernel`].
    pub fn resolve_partition(&self, kernel_handle: KernelHandle) -> Result<Arc<VmbusPartition>> {
        self.get_kernel(kernel_handle)
    }

    /// The table for looking handles up from `context`: a context that no longer exists has no open handles, so
    /// the failure is [`NtStatus::INVALID_HANDLE`].
    fn lookup_table(&self, context: ContextId) -> Result<Arc<HandleTable>> {
        self.table(context).map_err(|_| NtStatus::INVALID_HANDLE)
    }

    /// Test hook: the id the next context gets.
    #[cfg(test)]
    fn set_next_context_id(&self, next: u32) {
        self.contexts.write().next = next;
    }
}
