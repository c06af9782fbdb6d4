/*
 * Kiln's stub guest: a few instructions that stand in for a guest kernel
 * when what is measured is the VMM's own cost (docs/stub-guest.md).
 *
 * It reports guest-init's InitStarted on the guest-init port, as guest-init
 * does first thing as PID 1 (guest-init/src/protocol.rs), so the VMM's boot
 * timer stops as it would for a real guest. Then, with `kiln.stub=beat` on
 * the kernel command line, it beats: "beat\r\n" on COM1 about every 2^22
 * TSC ticks (1.6 ms at 2.6 GHz), forever, so that it can be paused,
 * snapshotted and restored. Without the word it resets the machine
 * at once through the i8042 (or, where there is none, a triple fault),
 * which ends the VM.
 *
 * There are two ways in, one copy of the code assembled for each mode:
 * - the ELF entry, for the Linux 64-bit boot protocol that Kiln uses
 *   (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long
 *   mode, the low memory identity-mapped, %rsi the zero page;
 * - the PVH entry, named by the XEN_ELFNOTE_PHYS32_ENTRY note, which
 *   QEMU uses (xen/include/public/arch-x86/hvm/start_info.h): 32-bit
 *   protected mode without paging, %ebx the hvm_start_info.
 * Neither needs a stack or interrupts, so neither sets them up.
 */
	.intel_syntax noprefix

	/* INIT_PORT and INIT_STARTED (the value of InitEvent::InitStarted)
	 * come from guest-init/src/protocol.rs: `cargo xtask stub` passes
	 * them to `as` with --defsym. */
	/* The 8250 UART's transmit register at COM1 (the console). */
	.set COM1, 0x3f8
	/* i8042 command port and its "pulse the reset line" command. */
	.set I8042_COMMAND, 0x64
	.set I8042_RESET, 0xfe
	/* boot_params.hdr.cmd_line_ptr (Documentation/arch/x86/zero-page.rst). */
	.set ZERO_PAGE_CMD_LINE_PTR, 0x228
	/* hvm_start_info.cmdline_paddr: a 64-bit field; the low half suffices
	 * for a command line in the first 4 GiB, where every loader puts it. */
	.set START_INFO_CMDLINE, 0x18
	/* ELF note type of the PVH entry (xen/include/public/elfnote.h). */
	.set XEN_ELFNOTE_PHYS32_ENTRY, 18
	/* TSC ticks between heartbeats: 1 to 4 ms at 4 to 1 GHz. */
	.set BEAT_TICKS, 1 << 22

/*
 * The stub proper, entered with %esi the command line's address (0 for
 * none). It keeps to 32-bit registers and addresses, so it means the same
 * in both modes, and needs nothing else from either entry.
 */
.macro stub_main
	mov dx, INIT_PORT
	mov eax, INIT_STARTED
	out dx, eax

	/* Look for the word `kiln.stub=beat`: at each word's start, compare
	 * it with the pattern; a match must end where the word does. */
	test esi, esi
	jz .Lreset\@
.Lword\@:
	mov edi, offset beat_word
	mov ecx, esi
.Lcompare\@:
	mov al, byte ptr [edi]
	test al, al
	jz .Lpattern_end\@
	cmp al, byte ptr [ecx]
	jne .Lnext_word\@
	add ecx, 1
	add edi, 1
	jmp .Lcompare\@
.Lpattern_end\@:
	mov al, byte ptr [ecx]
	cmp al, ' '
	je .Lbeat\@
	test al, al
	jz .Lbeat\@
	/* Past the next space, or to the reset at the line's end. */
.Lnext_word\@:
	mov al, byte ptr [esi]
	test al, al
	jz .Lreset\@
	add esi, 1
	cmp al, ' '
	jne .Lnext_word\@
	jmp .Lword\@

.Lreset\@:
	mov al, I8042_RESET
	out I8042_COMMAND, al
	/* A machine without an i8042 (QEMU's microvm) ignores that: then a
	 * fault with an empty IDT triple-faults, which resets it all the same. */
	lidt [empty_idt]
	ud2

	/* The period counts from the start of one heartbeat to the next, in
	 * the TSC's low 32 bits: the unsigned difference is right across a
	 * wrap, and a TSC that jumps (a restore) only makes one beat early. */
.Lbeat\@:
	rdtsc
	mov ebx, eax
	mov esi, offset heartbeat
	mov dx, COM1
.Lsend\@:
	mov al, byte ptr [esi]
	test al, al
	jz .Lwait\@
	out dx, al
	add esi, 1
	jmp .Lsend\@
.Lwait\@:
	pause
	rdtsc
	sub eax, ebx
	cmp eax, BEAT_TICKS
	jb .Lwait\@
	jmp .Lbeat\@
.endm

	.text
	.code64
	.globl stub_entry64
stub_entry64:
	mov esi, dword ptr [rsi + ZERO_PAGE_CMD_LINE_PTR]
	stub_main

	.code32
	.globl stub_entry32
stub_entry32:
	mov esi, dword ptr [ebx + START_INFO_CMDLINE]
	stub_main

	.section .rodata
beat_word:
	.asciz "kiln.stub=beat"
heartbeat:
	.asciz "beat\r\n"
	/* An IDT register operand of limit 0: 6 bytes in 32-bit mode, 10 in
	 * 64-bit mode. */
empty_idt:
	.zero 10

	/* The PVH entry (an ELF note: namesz, descsz, type, name, desc). */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4
	.long 8
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.balign 4
	.quad stub_entry32
