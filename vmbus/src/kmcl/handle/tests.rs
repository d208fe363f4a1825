//! Tests of the handle tables: statuses, generations, contexts, reference counts, conversion, concurrency.

extern crate std;

use super::*;
use core::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

/// A VMBus handle object that counts its drops.
struct Tracked {
    id: u64,
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

impl KernelObject for Tracked {
    const TYPE_NAME: &'static str = "Tracked";
    const IS_VMBUS_HANDLE: bool = true;
}

/// An object that is not a VMBus handle.
#[derive(Debug)]
struct Event(u32);

impl KernelObject for Event {
    const TYPE_NAME: &'static str = "Event";
}

fn partition(id: u64) -> Arc<VmbusPartition> {
    Arc::new(VmbusPartition::new(PartitionId(id), "child"))
}

#[test]
fn insert_get_close_round_trip() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let object = partition(7);
    let handle = handles.insert(context, object.clone()).unwrap();
    assert_eq!(handle.raw().context(), context);
    assert!(!handle.raw().is_null());
    assert_eq!(
        Arc::strong_count(&object),
        2,
        "the table holds one reference"
    );
    let got = handles.get(context, handle).unwrap();
    assert!(Arc::ptr_eq(&got, &object));
    assert_eq!(got.id(), PartitionId(7));
    assert_eq!(got.name(), "child");
    assert_eq!(
        Arc::strong_count(&object),
        3,
        "a look-up returns a strong reference"
    );
    drop(got);
    let table = handles.table(context).unwrap();
    assert_eq!(table.object_type(handle.raw()), Ok("VmbusPartition"));
    assert_eq!(table.len(), 1);
    assert!(
        table
            .get_any(handle.raw())
            .unwrap()
            .downcast::<VmbusPartition>()
            .is_ok()
    );
    assert_eq!(handles.close(context, handle.raw()), Ok(()));
    assert!(table.is_empty());
    assert_eq!(
        Arc::strong_count(&object),
        1,
        "closing dropped the table's reference"
    );
}

#[test]
fn closing_twice_fails_with_invalid_handle() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let handle = handles.insert(context, partition(1)).unwrap().raw();
    assert_eq!(handles.close(context, handle), Ok(()));
    assert_eq!(
        handles.close(context, handle),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.get(context, Handle::<VmbusPartition>::from_raw(handle)),
        Err(NtStatus::INVALID_HANDLE)
    );
}

#[test]
fn a_reused_slot_gets_a_new_generation_and_the_old_handle_fails() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let old = handles.insert(context, partition(1)).unwrap();
    handles.close(context, old.raw()).unwrap();
    let new = handles.insert(context, partition(2)).unwrap();
    assert_eq!(
        new.raw().slot(),
        old.raw().slot(),
        "the freed slot is reused"
    );
    assert_ne!(new.raw().generation(), old.raw().generation());
    assert_eq!(
        handles.get(context, old),
        Err(NtStatus::INVALID_HANDLE),
        "never aliased to the new object"
    );
    assert_eq!(
        handles.close(context, old.raw()),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.vmb_convert_vmbus_handle_to_kernel_handle(context, old.raw()),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(handles.get(context, new).unwrap().id(), PartitionId(2));
}

#[test]
fn a_slot_whose_generation_is_exhausted_is_retired() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let table = handles.table(context).unwrap();
    let first = table.insert(partition(1)).unwrap();
    table.close(first.raw()).unwrap();
    table.set_slot_generation(first.raw().slot(), u32::MAX);
    let last = table.insert(partition(2)).unwrap();
    assert_eq!(
        (last.raw().slot(), last.raw().generation()),
        (first.raw().slot(), u32::MAX)
    );
    table.close(last.raw()).unwrap();
    let next = table.insert(partition(3)).unwrap();
    assert_ne!(
        next.raw().slot(),
        last.raw().slot(),
        "the exhausted slot is never reused"
    );
    assert_eq!(table.get(last), Err(NtStatus::INVALID_HANDLE));
    // No generation 0 (the null handle) was ever handed out for the retired slot.
    let wrapped =
        Handle::<VmbusPartition>::from_raw(RawHandle::from_parts(context, last.raw().slot(), 0));
    assert_eq!(table.get(wrapped), Err(NtStatus::INVALID_HANDLE));
}

#[test]
fn null_and_made_up_handles_fail() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let live = handles.insert(context, partition(1)).unwrap().raw();
    let null = RawHandle::NULL;
    assert!(null.is_null());
    assert_eq!(
        handles.close(ContextId::KERNEL, null),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.vmb_convert_vmbus_handle_to_kernel_handle(context, null),
        Err(NtStatus::INVALID_HANDLE)
    );
    for (slot, generation) in [
        (live.slot(), 0),
        (live.slot(), live.generation() + 1),
        (live.slot() + 1, 1),
        (u32::MAX, 1),
    ] {
        let forged = RawHandle::from_parts(context, slot, generation);
        assert_eq!(
            handles.close(context, forged),
            Err(NtStatus::INVALID_HANDLE),
            "{forged}"
        );
        assert_eq!(
            handles.vmb_convert_vmbus_handle_to_kernel_handle(context, forged),
            Err(NtStatus::INVALID_HANDLE)
        );
    }
    assert_eq!(
        handles.table(context).unwrap().len(),
        1,
        "failed operations changed nothing"
    );
}

proptest::proptest! {
    /// A forged handle is accepted only when it equals a live handle exactly, and then means that handle's object.
    #[test]
    fn forged_handles_never_alias(
        closes in proptest::collection::vec(proptest::bool::ANY, 1..40),
        forged in proptest::collection::vec((0u32..48, 0u32..4), 1..64),
    ) {
        let handles = Handles::new();
        let context = handles.create_context().unwrap();
        let mut live = Vec::new();
        for (id, close) in closes.iter().enumerate() {
            let handle = handles.insert(context, partition(id as u64)).unwrap();
            if *close {
                handles.close(context, handle.raw()).unwrap();
            } else {
                live.push((handle, id as u64));
            }
        }
        for (slot, generation) in forged {
            let raw = RawHandle::from_parts(context, slot, generation);
            let result = handles.get(context, Handle::<VmbusPartition>::from_raw(raw));
            match live.iter().find(|(handle, _)| handle.raw() == raw) {
                Some((_, id)) => proptest::prop_assert_eq!(result.unwrap().id(), PartitionId(*id)),
                None => proptest::prop_assert_eq!(result, Err(NtStatus::INVALID_HANDLE)),
            }
        }
    }
}

#[test]
fn a_handle_of_another_context_fails_with_invalid_handle() {
    let handles = Handles::new();
    let owner = handles.create_context().unwrap();
    let other = handles.create_context().unwrap();
    let object = partition(1);
    let handle = handles.insert(owner, object.clone()).unwrap();
    // Give `other` a live handle in the same slot and generation, so only the context tells them apart.
    let neighbour = handles.insert(other, partition(2)).unwrap();
    assert_eq!(
        (neighbour.raw().slot(), neighbour.raw().generation()),
        (handle.raw().slot(), handle.raw().generation())
    );
    assert_eq!(handles.get(other, handle), Err(NtStatus::INVALID_HANDLE));
    assert_eq!(
        handles.close(other, handle.raw()),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.vmb_convert_vmbus_handle_to_kernel_handle(other, handle.raw()),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.duplicate(other, handle.raw(), other),
        Err(NtStatus::INVALID_HANDLE)
    );
    // The same numbers with the other context's tag are the other context's own handle, not the owner's object.
    let retagged = RawHandle::from_parts(other, handle.raw().slot(), handle.raw().generation());
    assert_eq!(
        handles
            .get(other, Handle::<VmbusPartition>::from_raw(retagged))
            .unwrap()
            .id(),
        PartitionId(2)
    );
    // A context handle is not a kernel handle either.
    assert_eq!(KernelHandle::from_raw(handle.raw()), None);
    assert_eq!(
        handles.get(ContextId::KERNEL, handle),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.get(owner, handle).unwrap().id(),
        PartitionId(1),
        "still valid where it belongs"
    );
    assert_eq!(Arc::strong_count(&object), 2);
}

#[test]
fn a_typed_look_up_of_the_wrong_type_fails_with_object_type_mismatch() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let event = handles.insert(context, Arc::new(Event(5))).unwrap();
    let as_partition = Handle::<VmbusPartition>::from_raw(event.raw());
    assert_eq!(
        handles.get(context, as_partition),
        Err(NtStatus::OBJECT_TYPE_MISMATCH)
    );
    assert_eq!(handles.get(context, event).unwrap().0, 5);
    assert_eq!(
        handles.table(context).unwrap().object_type(event.raw()),
        Ok("Event")
    );
}

#[test]
fn converting_an_object_that_is_not_a_vmbus_handle_fails_with_object_type_mismatch() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let object = Arc::new(Event(5));
    let event = handles.insert(context, object.clone()).unwrap();
    assert_eq!(
        handles.vmb_convert_vmbus_handle_to_kernel_handle(context, event.raw()),
        Err(NtStatus::OBJECT_TYPE_MISMATCH)
    );
    assert!(
        handles.kernel_table().is_empty(),
        "no kernel handle was opened"
    );
    assert_eq!(Arc::strong_count(&object), 2, "no reference leaked");
}

#[test]
fn resolving_a_kernel_handle_to_something_else_than_a_partition_fails() {
    let handles = Handles::new();
    let kernel = handles.kernel_table().insert(Arc::new(Event(1))).unwrap();
    let kernel = KernelHandle::from_raw(kernel.raw()).unwrap();
    assert_eq!(
        handles.resolve_partition(kernel),
        Err(NtStatus::OBJECT_TYPE_MISMATCH)
    );
    assert_eq!(handles.get_kernel::<Event>(kernel).unwrap().0, 1);
    handles.close_kernel_handle(kernel).unwrap();
    assert_eq!(
        handles.resolve_partition(kernel),
        Err(NtStatus::INVALID_HANDLE)
    );
}

#[test]
fn converted_kernel_handle_refers_to_the_same_object_and_keeps_it_alive() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let object = Arc::new(Tracked {
        id: 42,
        drops: drops.clone(),
    });
    let weak = Arc::downgrade(&object);
    let vmbus = handles.insert(context, object).unwrap();

    let kernel = handles
        .vmb_convert_vmbus_handle_to_kernel_handle(context, vmbus.raw())
        .unwrap();
    assert_eq!(kernel.raw().context(), ContextId::KERNEL);
    assert_eq!(weak.strong_count(), 2, "one reference per handle");
    let through_kernel = handles.get_kernel::<Tracked>(kernel).unwrap();
    assert!(Arc::ptr_eq(
        &through_kernel,
        &handles.get(context, vmbus).unwrap()
    ));
    assert_eq!(through_kernel.id, 42);
    drop(through_kernel);

    // The context's handle can be closed first: the kernel handle keeps the object.
    handles.close(context, vmbus.raw()).unwrap();
    assert_eq!(weak.strong_count(), 1);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    assert_eq!(handles.get_kernel::<Tracked>(kernel).unwrap().id, 42);

    // The caller closes the kernel handle: that drops the object, once.
    handles.close_kernel_handle(kernel).unwrap();
    assert_eq!(weak.strong_count(), 0);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert_eq!(
        handles.close_kernel_handle(kernel),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.get_kernel::<Tracked>(kernel).err(),
        Some(NtStatus::INVALID_HANDLE)
    );
}

#[test]
fn the_server_path_convert_then_resolve_the_partition() {
    // VM worker context opens the VMBus handle; a driver in it converts; the server resolves the kernel handle.
    let handles = Handles::new();
    let worker = handles.create_context().unwrap();
    let vmbus = handles.insert(worker, partition(3)).unwrap();
    let kernel = handles
        .vmb_convert_vmbus_handle_to_kernel_handle(worker, vmbus.raw())
        .unwrap();
    let chosen = handles.resolve_partition(kernel).unwrap();
    assert_eq!(chosen.id(), PartitionId(3));
    assert!(Arc::ptr_eq(&chosen, &handles.get(worker, vmbus).unwrap()));
    // Each conversion is a new kernel handle.
    let again = handles
        .vmb_convert_vmbus_handle_to_kernel_handle(worker, vmbus.raw())
        .unwrap();
    assert_ne!(again, kernel);
    assert_eq!(handles.kernel_table().len(), 2);
    handles.close_kernel_handle(kernel).unwrap();
    handles.close_kernel_handle(again).unwrap();
    assert_eq!(handles.open_handles(), 1);
}

#[test]
fn converting_from_the_kernel_context_duplicates_a_kernel_handle() {
    let handles = Handles::new();
    let first = handles.kernel_table().insert(partition(9)).unwrap();
    let second = handles
        .vmb_convert_vmbus_handle_to_kernel_handle(ContextId::KERNEL, first.raw())
        .unwrap();
    assert_ne!(second.raw(), first.raw());
    assert_eq!(
        handles.resolve_partition(second).unwrap().id(),
        PartitionId(9)
    );
    assert_eq!(handles.kernel_table().len(), 2);
}

#[test]
fn destroying_a_context_closes_its_handles() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let mut raw = Vec::new();
    for id in 0..5 {
        raw.push(
            handles
                .insert(
                    context,
                    Arc::new(Tracked {
                        id,
                        drops: drops.clone(),
                    }),
                )
                .unwrap(),
        );
    }
    let kept = handles
        .vmb_convert_vmbus_handle_to_kernel_handle(context, raw[2].raw())
        .unwrap();
    assert_eq!(handles.destroy_context(context), Ok(5));
    assert_eq!(
        drops.load(Ordering::SeqCst),
        4,
        "the object with a kernel handle lives on"
    );
    assert_eq!(handles.get_kernel::<Tracked>(kept).unwrap().id, 2);
    for handle in &raw {
        assert_eq!(
            handles.get(context, *handle).err(),
            Some(NtStatus::INVALID_HANDLE)
        );
        assert_eq!(
            handles.close(context, handle.raw()),
            Err(NtStatus::INVALID_HANDLE)
        );
        assert_eq!(
            handles.vmb_convert_vmbus_handle_to_kernel_handle(context, handle.raw()),
            Err(NtStatus::INVALID_HANDLE)
        );
    }
    assert_eq!(
        handles.insert(context, partition(1)).err(),
        Some(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(
        handles.table(context).err(),
        Some(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(
        handles.destroy_context(context),
        Err(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(handles.context_count(), 0);
    handles.close_kernel_handle(kept).unwrap();
    assert_eq!(drops.load(Ordering::SeqCst), 5);
    assert_eq!(handles.open_handles(), 0);
}

#[test]
fn a_table_kept_after_its_context_was_destroyed_refuses_new_handles() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let table = handles.table(context).unwrap();
    handles.destroy_context(context).unwrap();
    let object = partition(1);
    assert_eq!(
        table.insert(object.clone()).err(),
        Some(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(
        Arc::strong_count(&object),
        1,
        "the refused reference was dropped"
    );
}

#[test]
fn the_kernel_context_cannot_be_destroyed_and_unknown_contexts_are_refused() {
    let handles = Handles::new();
    assert_eq!(
        handles.destroy_context(ContextId::KERNEL),
        Err(NtStatus::INVALID_PARAMETER)
    );
    let never = ContextId::from_u32(77);
    assert_eq!(
        handles.insert(never, partition(1)).err(),
        Some(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(
        handles.close(never, RawHandle::from_parts(never, 0, 1)),
        Err(NtStatus::INVALID_HANDLE)
    );
    assert_eq!(
        handles.destroy_context(never),
        Err(NtStatus::PROCESS_IS_TERMINATING)
    );
    assert_eq!(ContextId::KERNEL.to_string(), "kernel");
    assert_eq!(never.to_string(), "context 77");
    assert_eq!(never.as_u32(), 77);
}

#[test]
fn context_ids_are_never_reused_and_run_out_cleanly() {
    let handles = Handles::new();
    let first = handles.create_context().unwrap();
    handles.destroy_context(first).unwrap();
    let second = handles.create_context().unwrap();
    assert_ne!(first, second);
    assert!(!first.is_kernel() && !second.is_kernel());
    handles.set_next_context_id(u32::MAX - 1);
    assert_eq!(
        handles.create_context(),
        Ok(ContextId::from_u32(u32::MAX - 1))
    );
    assert_eq!(
        handles.create_context(),
        Err(NtStatus::INSUFFICIENT_RESOURCES)
    );
    assert_eq!(handles.context_count(), 2);
}

#[test]
fn a_full_table_fails_with_insufficient_resources() {
    let handles = Handles::with_max_handles_per_table(3);
    let context = handles.create_context().unwrap();
    let mut open = Vec::new();
    for id in 0..3 {
        open.push(handles.insert(context, partition(id)).unwrap());
    }
    let object = partition(3);
    assert_eq!(
        handles.insert(context, object.clone()).err(),
        Some(NtStatus::INSUFFICIENT_RESOURCES)
    );
    assert_eq!(
        Arc::strong_count(&object),
        1,
        "the refused reference was dropped"
    );
    assert_eq!(
        handles.duplicate(context, open[0].raw(), context).err(),
        Some(NtStatus::INSUFFICIENT_RESOURCES)
    );
    handles.close(context, open[1].raw()).unwrap();
    assert!(
        handles.insert(context, object).is_ok(),
        "a closed slot makes room"
    );

    // A full kernel table makes the conversion fail without leaking a reference.
    let mut kernel = Vec::new();
    for _ in 0..3 {
        kernel.push(
            handles
                .vmb_convert_vmbus_handle_to_kernel_handle(context, open[0].raw())
                .unwrap(),
        );
    }
    let target = handles.get(context, open[0]).unwrap();
    let before = Arc::strong_count(&target);
    assert_eq!(
        handles.vmb_convert_vmbus_handle_to_kernel_handle(context, open[0].raw()),
        Err(NtStatus::INSUFFICIENT_RESOURCES)
    );
    assert_eq!(Arc::strong_count(&target), before);
}

#[test]
fn duplicate_within_and_between_contexts() {
    let handles = Handles::new();
    let a = handles.create_context().unwrap();
    let b = handles.create_context().unwrap();
    let object = partition(4);
    let original = handles.insert(a, object.clone()).unwrap();
    let same_table = handles.table(a).unwrap().duplicate(original.raw()).unwrap();
    let other_table = handles.duplicate(a, original.raw(), b).unwrap();
    assert_eq!(other_table.context(), b);
    assert_eq!(Arc::strong_count(&object), 4);
    handles.close(a, original.raw()).unwrap();
    assert_eq!(
        handles
            .get(b, Handle::<VmbusPartition>::from_raw(other_table))
            .unwrap()
            .id(),
        PartitionId(4)
    );
    handles.close(a, same_table).unwrap();
    handles.close(b, other_table).unwrap();
    assert_eq!(Arc::strong_count(&object), 1);
    assert_eq!(
        handles.duplicate(a, original.raw(), b),
        Err(NtStatus::INVALID_HANDLE)
    );
}

/// An object whose destructor closes another handle of the same table: it must not run under the table's lock.
struct ClosesOnDrop {
    table: Arc<HandleTable>,
    victim: RawHandle,
    result: Arc<Mutex<Option<Result<()>>>>,
}

impl Drop for ClosesOnDrop {
    fn drop(&mut self) {
        *self.result.lock() = Some(self.table.close(self.victim));
    }
}

impl KernelObject for ClosesOnDrop {
    const TYPE_NAME: &'static str = "ClosesOnDrop";
}

#[test]
fn objects_are_dropped_outside_the_table_lock() {
    let handles = Handles::new();
    let context = handles.create_context().unwrap();
    let table = handles.table(context).unwrap();
    let result = Arc::new(Mutex::new(None));

    let victim = table.insert(partition(1)).unwrap().raw();
    let closer = table
        .insert(Arc::new(ClosesOnDrop {
            table: table.clone(),
            victim,
            result: result.clone(),
        }))
        .unwrap();
    table.close(closer.raw()).unwrap();
    assert_eq!(
        *result.lock(),
        Some(Ok(())),
        "the destructor closed the other handle"
    );
    assert!(table.is_empty());

    // The same while the whole context is destroyed: the destructor's close finds the table already emptied.
    let victim = table.insert(partition(2)).unwrap().raw();
    table
        .insert(Arc::new(ClosesOnDrop {
            table: table.clone(),
            victim,
            result: result.clone(),
        }))
        .unwrap();
    drop(table);
    assert_eq!(handles.destroy_context(context), Ok(2));
    assert_eq!(*result.lock(), Some(Err(NtStatus::INVALID_HANDLE)));
}

#[test]
fn handle_values_print_and_compare() {
    let raw = RawHandle::from_parts(ContextId::from_u32(3), 5, 2);
    assert_eq!(raw.to_string(), "handle 5#2 of context 3");
    let typed = Handle::<Event>::from_raw(raw);
    let copy = typed;
    assert_eq!(copy, typed);
    assert_eq!(RawHandle::from(typed), raw);
    assert!(format!("{typed:?}").contains("Event"));
    let kernel = KernelHandle::from_raw(RawHandle::from_parts(ContextId::KERNEL, 1, 1)).unwrap();
    assert_eq!(RawHandle::from(kernel).context(), ContextId::KERNEL);
}

/// A small deterministic generator for the concurrency test.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn concurrent_open_close_convert_from_several_threads() {
    const THREADS: usize = 4;
    const OPS: usize = 10_000;

    let handles = Arc::new(Handles::new());
    let drops = Arc::new(AtomicUsize::new(0));
    // Handles each thread published, for the others to try (and fail) to use.
    let published: Arc<Mutex<Vec<(ContextId, RawHandle)>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Arc::new(std::sync::Barrier::new(THREADS));

    let workers: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            let handles = handles.clone();
            let drops = drops.clone();
            let published = published.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut random =
                    XorShift(0x9E37_79B9_7F4A_7C15 ^ ((thread_index as u64 + 1) * 0x1234_5678));
                let mut context = handles.create_context().unwrap();
                let mut local: Vec<(Handle<Tracked>, u64)> = Vec::new();
                let mut kernel: Vec<(KernelHandle, u64)> = Vec::new();
                let mut closed_kernel: Vec<KernelHandle> = Vec::new();
                let mut created = 0usize;
                let mut converts = 0usize;
                for op in 0..OPS {
                    match random.below(10) {
                        0..=2 => {
                            let id = (thread_index as u64) << 32 | created as u64;
                            let handle = handles
                                .insert(
                                    context,
                                    Arc::new(Tracked {
                                        id,
                                        drops: drops.clone(),
                                    }),
                                )
                                .unwrap();
                            created += 1;
                            local.push((handle, id));
                            if op % 64 == 0 {
                                published.lock().push((context, handle.raw()));
                            }
                        }
                        3 | 4 if !local.is_empty() => {
                            let (handle, id) = local[random.below(local.len())];
                            let converted = handles
                                .vmb_convert_vmbus_handle_to_kernel_handle(context, handle.raw())
                                .unwrap();
                            assert_eq!(
                                handles.get_kernel::<Tracked>(converted).unwrap().id,
                                id,
                                "converted to the wrong object"
                            );
                            kernel.push((converted, id));
                            converts += 1;
                        }
                        5 if !local.is_empty() => {
                            let (handle, _) = local.swap_remove(random.below(local.len()));
                            handles.close(context, handle.raw()).unwrap();
                            assert_eq!(
                                handles.close(context, handle.raw()),
                                Err(NtStatus::INVALID_HANDLE)
                            );
                        }
                        6 if !kernel.is_empty() => {
                            let (handle, id) = kernel.swap_remove(random.below(kernel.len()));
                            assert_eq!(handles.get_kernel::<Tracked>(handle).unwrap().id, id);
                            handles.close_kernel_handle(handle).unwrap();
                            closed_kernel.push(handle);
                        }
                        7 => {
                            // Other threads' handles and closed kernel handles never work, whatever reused the slots.
                            let foreign = {
                                let published = published.lock();
                                (!published.is_empty())
                                    .then(|| published[random.below(published.len())])
                            };
                            if let Some((owner, raw)) = foreign
                                && owner != context
                            {
                                assert_eq!(
                                    handles.vmb_convert_vmbus_handle_to_kernel_handle(context, raw),
                                    Err(NtStatus::INVALID_HANDLE)
                                );
                                assert_eq!(
                                    handles.close(context, raw),
                                    Err(NtStatus::INVALID_HANDLE)
                                );
                            }
                            if !closed_kernel.is_empty() {
                                let stale = closed_kernel[random.below(closed_kernel.len())];
                                assert_eq!(
                                    handles.get_kernel::<Tracked>(stale).err(),
                                    Some(NtStatus::INVALID_HANDLE)
                                );
                            }
                        }
                        8 => {
                            let event =
                                handles.insert(context, Arc::new(Event(op as u32))).unwrap();
                            assert_eq!(
                                handles.vmb_convert_vmbus_handle_to_kernel_handle(
                                    context,
                                    event.raw()
                                ),
                                Err(NtStatus::OBJECT_TYPE_MISMATCH)
                            );
                            handles.close(context, event.raw()).unwrap();
                        }
                        _ if op % 1000 == 999 => {
                            // Destroy the context with its handles open and start over in a new one.
                            let closed = handles.destroy_context(context).unwrap();
                            assert_eq!(closed, local.len());
                            for (handle, _) in local.drain(..) {
                                assert_eq!(
                                    handles.get(context, handle).err(),
                                    Some(NtStatus::INVALID_HANDLE)
                                );
                            }
                            context = handles.create_context().unwrap();
                        }
                        _ => {}
                    }
                }
                for (handle, id) in kernel.drain(..) {
                    assert_eq!(handles.get_kernel::<Tracked>(handle).unwrap().id, id);
                    handles.close_kernel_handle(handle).unwrap();
                }
                assert_eq!(handles.destroy_context(context).unwrap(), local.len());
                (created, converts)
            })
        })
        .collect();

    let mut created = 0;
    let mut converts = 0;
    for worker in workers {
        let (c, v) = worker.join().unwrap();
        created += c;
        converts += v;
    }
    assert!(
        created > THREADS * OPS / 5 && converts > THREADS * OPS / 10,
        "the mix ran: {created} {converts}"
    );
    assert_eq!(handles.open_handles(), 0, "no handle leaked");
    assert_eq!(handles.context_count(), 0);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        created,
        "every object dropped exactly once"
    );
}
