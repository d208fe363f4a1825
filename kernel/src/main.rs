//! The unikernel (being written).
#![no_std]
#![no_main]

use bootloader_api::{BootInfo, entry_point};

entry_point!(kmain);

fn kmain(_boot_info: &'static mut BootInfo) -> ! {
    loop {
        x86_64::instructions::hlt();
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {
        x86_64::instructions::hlt();
    }
}
