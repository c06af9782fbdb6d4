/*
 * Kiln's hostile stub guest: a driver-less guest that attacks the VMM's
 * devices the way a compromised guest kernel could (docs/security.md,
 * "Bad guests"). Like the stub guest (stub.s) it needs no kernel and runs
 * natively on a PVM host; unlike it, it only has the 64-bit entry of the
 * Linux boot protocol that Kiln uses: it never runs under QEMU.
 *
 * The attack is one word on the kernel command line, `kiln.hostile=NAME`:
 *   blk-loop, vsock-loop          a descriptor chain whose last descriptor
 *                                 points back at its head
 *   blk-outside, vsock-outside    a data descriptor 256 GiB up, past the
 *                                 end of guest memory
 *   blk-overflow, vsock-overflow  a data descriptor whose address + length
 *                                 wraps (len 0xffffffff near 2^64)
 *   blk-avail, vsock-avail        an available ring index 0x8000 ahead of
 *                                 a queue of 8
 *   serial-flood                  SERIAL_FLOOD_BYTES bytes to COM1's THR
 *   vsock-credit                  accepts a host connection, then never
 *                                 returns receive buffers or credit
 *   init-flood                    INIT_FLOOD_WRITES malformed writes to
 *                                 the guest-init port
 *   ioapic-flood                  IOAPIC_FLOOD_ROUNDS rounds of redirection
 *                                 entries rewritten with arbitrary bits (most
 *                                 a new route for KVM), stray widths and
 *                                 reserved registers; then the version
 *                                 register read back:
 *                                   hostile: ioapic-flood ver=V
 * A queue attack offers its chain QUEUE_ROUNDS times, each time waiting
 * for the device to return it (or to set DEVICE_NEEDS_RESET, or for a
 * timeout), then prints one line on COM1:
 *   hostile: NAME status=S used=U rounds=R
 * (hexadecimal: the device status register, the used ring's index, the
 * rounds the device answered). After a virtio-blk attack it resets the
 * device, sets it up again and reads sector 0 through it, and prints
 *   hostile: recovered status=S used=U blk=B
 * (B the request's status byte, 0 for VIRTIO_BLK_S_OK). Then it resets
 * the machine through the i8042, which ends the VM with status 0.
 * An unknown or missing attack prints "hostile: no attack" and resets.
 *
 * INIT_PORT, INIT_STARTED, VIRTIO_MMIO_START, MMIO_SLOT_SIZE,
 * IOAPIC_START and PDPT_START come from the VMM's own constants: `cargo
 * xtask stub` passes them to `as` with --defsym.
 */
	.intel_syntax noprefix

	.set COM1, 0x3f8
	.set I8042_COMMAND, 0x64
	.set I8042_RESET, 0xfe
	/* boot_params.hdr.cmd_line_ptr (Documentation/arch/x86/zero-page.rst). */
	.set ZERO_PAGE_CMD_LINE_PTR, 0x228

	/* The stub's own memory, above its code at 1 MiB; the VM needs 8 MiB. */
	.set STACK_TOP, 0x280000
	/* A page directory of 2 MiB pages mapping the fourth GiB, where the
	 * virtio-mmio slots are: the boot page tables map only the first. */
	.set MMIO_PD, 0x300000
	.set DESC_TABLE, 0x400000
	.set AVAIL_RING, 0x401000
	.set USED_RING, 0x402000
	.set BUFFERS, 0x403000
	/* vsock-credit's receive queue: rings, then 8 buffers of a page. */
	.set RX_RINGS, 0x410000
	.set RX_AVAIL, RX_RINGS + 0x1000
	.set RX_USED, RX_RINGS + 0x2000
	.set RX_BUFFERS, RX_RINGS + 0x3000
	/* The attack's parameters for the chain writers: the header's
	 * length (dword) and the data descriptor's flags (dword). */
	.set PARAMS, 0x3ff000
	.set PARAM_HEADER_LEN, PARAMS
	.set PARAM_DATA_FLAGS, PARAMS + 4

	/* Page table entry bits (Intel SDM vol. 3, §4.5): present, writable,
	 * and in a page directory, a 2 MiB page; PCD for MMIO. */
	.set PTE_PRESENT_WRITABLE, 0x3
	.set PDE_2M_UNCACHED, 0x93

	/* virtio-mmio registers (VIRTIO 1.1 §4.2.2). */
	.set MMIO_MAGIC_VALUE, 0x000
	.set MMIO_DEVICE_ID, 0x008
	.set MMIO_DRIVER_FEATURES, 0x020
	.set MMIO_DRIVER_FEATURES_SEL, 0x024
	.set MMIO_QUEUE_SEL, 0x030
	.set MMIO_QUEUE_NUM, 0x038
	.set MMIO_QUEUE_READY, 0x044
	.set MMIO_QUEUE_NOTIFY, 0x050
	.set MMIO_STATUS, 0x070
	.set MMIO_QUEUE_DESC_LOW, 0x080
	.set MMIO_QUEUE_DESC_HIGH, 0x084
	.set MMIO_QUEUE_DRIVER_LOW, 0x090
	.set MMIO_QUEUE_DRIVER_HIGH, 0x094
	.set MMIO_QUEUE_DEVICE_LOW, 0x0a0
	.set MMIO_QUEUE_DEVICE_HIGH, 0x0a4
	/* "virt" (VIRTIO 1.1 §4.2.2). */
	.set MMIO_MAGIC, 0x74726976
	/* At most this many slots are looked at. */
	.set MMIO_SLOTS, 8

	/* Device status bits (VIRTIO 1.1 §2.1). */
	.set STATUS_ACKNOWLEDGE, 1
	.set STATUS_DRIVER, 2
	.set STATUS_DRIVER_OK, 4
	.set STATUS_FEATURES_OK, 8
	.set STATUS_NEEDS_RESET, 0x40
	/* VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of window 1 (§6). */
	.set FEATURE_WINDOW_HIGH, 1
	.set VERSION_1_IN_HIGH_WINDOW, 1

	/* Device IDs (VIRTIO 1.1 §5) and the queue each attack uses: the
	 * block device's only queue, the socket device's transmit queue (§5.10.2). */
	.set VIRTIO_ID_BLOCK, 2
	.set VIRTIO_ID_VSOCK, 19
	.set BLOCK_QUEUE, 0
	.set VSOCK_TX_QUEUE, 1

	/* Split virtqueue layout (VIRTIO 1.1 §2.6): 16-byte descriptors
	 * (addr, len, flags, next); avail and used rings with a 16-bit index
	 * at offset 2 and entries from offset 4. */
	.set QUEUE_SIZE, 8
	.set DESC_SIZE, 16
	.set DESC_ADDR, 0
	.set DESC_LEN, 8
	.set DESC_FLAGS, 12
	.set DESC_NEXT, 14
	.set DESC_F_NEXT, 1
	.set DESC_F_WRITE, 2
	.set RING_IDX, 2
	.set RING_ENTRIES, 4

	/* virtio-blk request header (VIRTIO 1.1 §5.2.6): type, reserved, sector. */
	.set BLK_HEADER_LEN, 16
	.set BLK_SECTOR, 512
	/* virtio-vsock packet header (VIRTIO 1.1 §5.10.6): 44 bytes, with
	 * len at 24, type at 28 and op at 30; a stream's RW packet. */
	.set VSOCK_HEADER_LEN, 44
	.set VSOCK_HDR_LEN, 24
	.set VSOCK_HDR_TYPE, 28
	.set VSOCK_HDR_OP, 30
	.set VSOCK_HDR_SRC_CID, 0
	.set VSOCK_HDR_DST_CID, 8
	.set VSOCK_HDR_SRC_PORT, 16
	.set VSOCK_HDR_DST_PORT, 20
	.set VSOCK_HDR_BUF_ALLOC, 36
	.set VSOCK_TYPE_STREAM, 1
	.set VSOCK_OP_RESPONSE, 2
	.set VSOCK_OP_RW, 5
	.set VSOCK_RX_QUEUE, 0
	/* The receive buffer vsock-credit advertises, and never frees. */
	.set GUEST_BUF_ALLOC, 4096
	/* vsock-credit waits up to this many WAIT_TICKS for the host to
	 * connect, then sits on its credit for VSOCK_IDLE_WAITS more. */
	.set VSOCK_CONNECT_WAITS, 16
	.set VSOCK_IDLE_WAITS, 2

	/* How hard each attack pushes, and how long it waits for the device:
	 * 2^31 TSC ticks, 0.5 to 2 s at 4 to 1 GHz. */
	.set QUEUE_ROUNDS, 1000
	.set WAIT_TICKS, 1 << 31
	.set AVAIL_AHEAD, 0x8000
	.set OUTSIDE_ADDRESS, 0x4000000000
	.set WRAPPING_ADDRESS, 0xffffffffffffff00
	.set SERIAL_FLOOD_BYTES, 1 << 20
	.set INIT_FLOOD_WRITES, 1 << 16
	.set IOAPIC_FLOOD_ROUNDS, 1 << 14
	/* The IOAPIC's registers (82093AA §3): IOREGSEL, IOWIN, IOAPICVER,
	 * the first redirection register, and the first one past the last. */
	.set IOREGSEL, 0x00
	.set IOWIN, 0x10
	.set IOAPICVER, 0x01
	.set IOREDTBL, 0x10
	.set IOREDTBL_END, 0x40
	/* Spreads a round's number over all 32 bits (Knuth's multiplier). */
	.set SCATTER, 0x9e3779b9
	/* An entry of the attack table (.rodata): four quadwords. */
	.set ATTACK_WORD, 0
	.set ATTACK_RUN, 8
	.set ATTACK_CHAIN, 16
	.set ATTACK_STEP, 24
	.set ATTACK_ENTRY_SIZE, 32
	/* "kiln.hostile=": what precedes an attack's name in its word. */
	.set ATTACK_PREFIX_LEN, 13

	.text
	.code64
	.globl hostile_entry
hostile_entry:
	mov r15d, dword ptr [rsi + ZERO_PAGE_CMD_LINE_PTR]
	mov rsp, STACK_TOP
	mov dx, INIT_PORT
	mov eax, INIT_STARTED
	out dx, eax
	call map_mmio

	lea rbx, [rip + attacks]
.Lnext_attack:
	mov rdi, qword ptr [rbx + ATTACK_WORD]
	test rdi, rdi
	jz .Lno_attack
	call has_word
	test eax, eax
	jnz .Lfound
	add rbx, ATTACK_ENTRY_SIZE
	jmp .Lnext_attack
.Lfound:
	/* rbx stays the attack's table entry: its name is the report's. A
	 * queue attack's chain writer goes in r13, its avail step in r14. */
	mov r13, qword ptr [rbx + ATTACK_CHAIN]
	mov r14, qword ptr [rbx + ATTACK_STEP]
	call qword ptr [rbx + ATTACK_RUN]
	jmp reset
.Lno_attack:
	lea rsi, [rip + no_attack]
	call print
	jmp reset

reset:
	mov al, I8042_RESET
	out I8042_COMMAND, al
	hlt
	jmp reset

/* Maps the fourth GiB, 2 MiB pages identity-mapped, through PDPT entry 3. */
map_mmio:
	mov edi, MMIO_PD
	mov rax, 0xc0000000 | PDE_2M_UNCACHED
	mov ecx, 512
.Lmap_entry:
	mov qword ptr [rdi], rax
	add rdi, 8
	add rax, 1 << 21
	loop .Lmap_entry
	mov qword ptr [PDPT_START + 3 * 8], MMIO_PD | PTE_PRESENT_WRITABLE
	mov rax, cr3
	mov cr3, rax
	ret

/* eax = 1 if the command line at r15 holds the word at rdi, else 0. */
has_word:
	mov rsi, r15
	test rsi, rsi
	jz .Lno_word
.Lword:
	mov rcx, rdi
	mov rdx, rsi
.Lcompare:
	mov al, byte ptr [rcx]
	test al, al
	jz .Lpattern_end
	cmp al, byte ptr [rdx]
	jne .Lskip_word
	inc rcx
	inc rdx
	jmp .Lcompare
.Lpattern_end:
	mov al, byte ptr [rdx]
	cmp al, ' '
	je .Lyes_word
	test al, al
	jz .Lyes_word
.Lskip_word:
	mov al, byte ptr [rsi]
	test al, al
	jz .Lno_word
	inc rsi
	cmp al, ' '
	jne .Lskip_word
	jmp .Lword
.Lyes_word:
	mov eax, 1
	ret
.Lno_word:
	xor eax, eax
	ret

/* Writes the NUL-terminated string at rsi to COM1. */
print:
	mov dx, COM1
.Lprint_byte:
	mov al, byte ptr [rsi]
	test al, al
	jz .Lprinted
	out dx, al
	inc rsi
	jmp .Lprint_byte
.Lprinted:
	ret

/* Writes eax to COM1 as 8 hexadecimal digits. */
print_hex:
	mov ecx, 8
	mov dx, COM1
.Lhex_digit:
	rol eax, 4
	mov r8d, eax
	and r8d, 0xf
	lea r9, [rip + hex_digits]
	mov r8b, byte ptr [r9 + r8]
	xchg al, r8b
	out dx, al
	xchg al, r8b
	loop .Lhex_digit
	ret

/* Prints "hostile: <rsi> status=<S> used=<r8d> <rdi>=<r9d>\r\n", S the
 * status register of the device at rbp. */
report:
	push r9
	push rdi
	push r8
	push rsi
	lea rsi, [rip + report_prefix]
	call print
	pop rsi
	call print
	lea rsi, [rip + report_status]
	call print
	mov eax, dword ptr [rbp + MMIO_STATUS]
	call print_hex
	lea rsi, [rip + report_used]
	call print
	pop rax
	call print_hex
	mov al, ' '
	out dx, al
	pop rsi
	call print
	mov al, '='
	out dx, al
	pop rax
	call print_hex
	lea rsi, [rip + crlf]
	call print
	ret

/*
 * Finds the first virtio-mmio device of type edi and sets up its queue
 * esi (size QUEUE_SIZE, rings at DESC_TABLE, AVAIL_RING, USED_RING,
 * zeroed) up to DRIVER_OK. Returns its base in rbp, or 0 when there is
 * no such device.
 */
setup_device:
	call find_device
	test rbp, rbp
	jz .Lsetup_done
	call negotiate
	mov edi, DESC_TABLE
	call setup_queue
	call driver_ok
.Lsetup_done:
	ret

/* The base of the first virtio-mmio device of type edi in rbp, or 0. */
find_device:
	mov ebp, VIRTIO_MMIO_START
	mov ecx, MMIO_SLOTS
.Lslot:
	cmp dword ptr [rbp + MMIO_MAGIC_VALUE], MMIO_MAGIC
	jne .Lno_device
	cmp dword ptr [rbp + MMIO_DEVICE_ID], edi
	je .Lfound_device
	add ebp, MMIO_SLOT_SIZE
	loop .Lslot
.Lno_device:
	xor ebp, ebp
.Lfound_device:
	ret

/* The initialization of VIRTIO 1.1 §3.1.1 from a reset up to FEATURES_OK. */
negotiate:
	mov dword ptr [rbp + MMIO_STATUS], 0
	mov dword ptr [rbp + MMIO_STATUS], STATUS_ACKNOWLEDGE
	mov dword ptr [rbp + MMIO_STATUS], STATUS_ACKNOWLEDGE | STATUS_DRIVER
	mov dword ptr [rbp + MMIO_DRIVER_FEATURES_SEL], FEATURE_WINDOW_HIGH
	mov dword ptr [rbp + MMIO_DRIVER_FEATURES], VERSION_1_IN_HIGH_WINDOW
	mov dword ptr [rbp + MMIO_STATUS], STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
	ret

/* Queue esi of size QUEUE_SIZE on the rings at edi (descriptors, then
 * the available and used rings and buffers a page apart, all zeroed),
 * marked ready. */
setup_queue:
	push rdi
	mov ecx, 4 * 4096 / 8
	xor eax, eax
	rep stosq
	pop rdi
	mov dword ptr [rbp + MMIO_QUEUE_SEL], esi
	mov dword ptr [rbp + MMIO_QUEUE_NUM], QUEUE_SIZE
	mov dword ptr [rbp + MMIO_QUEUE_DESC_LOW], edi
	mov dword ptr [rbp + MMIO_QUEUE_DESC_HIGH], 0
	add edi, 0x1000
	mov dword ptr [rbp + MMIO_QUEUE_DRIVER_LOW], edi
	mov dword ptr [rbp + MMIO_QUEUE_DRIVER_HIGH], 0
	add edi, 0x1000
	mov dword ptr [rbp + MMIO_QUEUE_DEVICE_LOW], edi
	mov dword ptr [rbp + MMIO_QUEUE_DEVICE_HIGH], 0
	mov dword ptr [rbp + MMIO_QUEUE_READY], 1
	ret

driver_ok:
	mov dword ptr [rbp + MMIO_STATUS], STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
	ret

/* Writes descriptor eax: address rdx, length ecx, flags r8w, next r9w. */
write_desc:
	shl eax, 4
	add eax, DESC_TABLE
	mov qword ptr [rax + DESC_ADDR], rdx
	mov dword ptr [rax + DESC_LEN], ecx
	mov word ptr [rax + DESC_FLAGS], r8w
	mov word ptr [rax + DESC_NEXT], r9w
	ret

/* Descriptor 0: the header, leading to descriptor 1. */
write_header_desc:
	xor eax, eax
	mov edx, BUFFERS
	mov ecx, dword ptr [PARAM_HEADER_LEN]
	mov r8d, DESC_F_NEXT
	mov r9d, 1
	jmp write_desc

/* A header, then a data buffer whose `next` leads back to the header. */
chain_loop:
	call write_header_desc
	mov eax, 1
	mov edx, BUFFERS + 0x100
	mov ecx, BLK_SECTOR
	mov r8d, dword ptr [PARAM_DATA_FLAGS]
	or r8d, DESC_F_NEXT
	xor r9d, r9d
	jmp write_desc

/* A header, a data buffer at rdx of length ecx, a status byte. */
chain_bad_data:
	push rcx
	push rdx
	call write_header_desc
	mov eax, 1
	pop rdx
	pop rcx
	mov r8d, dword ptr [PARAM_DATA_FLAGS]
	or r8d, DESC_F_NEXT
	mov r9d, 2
	call write_desc
	/* The status byte: a well-formed end to an ill-formed chain. */
	mov eax, 2
	mov edx, BUFFERS + 0x200
	mov ecx, 1
	mov r8d, DESC_F_WRITE
	xor r9d, r9d
	jmp write_desc

chain_outside:
	mov rdx, OUTSIDE_ADDRESS
	mov ecx, 0x1000
	jmp chain_bad_data

chain_overflow:
	mov rdx, WRAPPING_ADDRESS
	mov ecx, 0xffffffff
	jmp chain_bad_data

/*
 * Sets up device type edi's queue esi, writes the chain with the routine
 * at r13, then QUEUE_ROUNDS times makes it available r14 entries ahead
 * and notifies, waiting each time for the used index to catch up (the
 * device answered), DEVICE_NEEDS_RESET, or WAIT_TICKS. Reports; rbx is
 * the attack's table entry. Returns the device's base in rbp.
 */
queue_attack:
	push rsi
	call setup_device
	pop r12
	test rbp, rbp
	jz .Lmissing
	call r13
	xor r10d, r10d
.Lround:
	/* Ring entry (index % size) names descriptor 0; the index moves on. */
	movzx eax, word ptr [AVAIL_RING + RING_IDX]
	and eax, QUEUE_SIZE - 1
	mov word ptr [AVAIL_RING + RING_ENTRIES + rax * 2], 0
	add word ptr [AVAIL_RING + RING_IDX], r14w
	mov dword ptr [rbp + MMIO_QUEUE_NOTIFY], r12d
	rdtsc
	mov r11d, eax
.Lwait:
	test dword ptr [rbp + MMIO_STATUS], STATUS_NEEDS_RESET
	jnz .Lattack_done
	movzx eax, word ptr [USED_RING + RING_IDX]
	cmp ax, word ptr [AVAIL_RING + RING_IDX]
	je .Lanswered
	pause
	rdtsc
	sub eax, r11d
	cmp eax, WAIT_TICKS
	jb .Lwait
	jmp .Lattack_done
.Lanswered:
	inc r10d
	cmp r10d, QUEUE_ROUNDS
	jb .Lround
.Lattack_done:
	mov rsi, qword ptr [rbx + ATTACK_WORD]
	add rsi, ATTACK_PREFIX_LEN
	movzx r8d, word ptr [USED_RING + RING_IDX]
	lea rdi, [rip + rounds_word]
	mov r9d, r10d
	jmp report
.Lmissing:
	lea rsi, [rip + no_device]
	jmp print

/* A virtio-blk attack, then a reset of the device and a read of sector 0. */
blk_attack:
	mov dword ptr [PARAM_HEADER_LEN], BLK_HEADER_LEN
	mov dword ptr [PARAM_DATA_FLAGS], DESC_F_WRITE
	mov edi, VIRTIO_ID_BLOCK
	mov esi, BLOCK_QUEUE
	call queue_attack
	test rbp, rbp
	jz .Lblk_gone
	mov edi, VIRTIO_ID_BLOCK
	mov esi, BLOCK_QUEUE
	call setup_device
	/* The header (type 0, VIRTIO_BLK_T_IN, of sector 0) is zeroed already. */
	mov edx, BUFFERS + 0x100
	mov ecx, BLK_SECTOR
	call chain_bad_data
	mov byte ptr [BUFFERS + 0x200], 0xff
	mov word ptr [AVAIL_RING + RING_ENTRIES], 0
	mov word ptr [AVAIL_RING + RING_IDX], 1
	mov dword ptr [rbp + MMIO_QUEUE_NOTIFY], BLOCK_QUEUE
	rdtsc
	mov r11d, eax
.Lrecover_wait:
	cmp word ptr [USED_RING + RING_IDX], 1
	je .Lrecovered
	pause
	rdtsc
	sub eax, r11d
	cmp eax, WAIT_TICKS
	jb .Lrecover_wait
.Lrecovered:
	lea rsi, [rip + recovered]
	movzx r8d, word ptr [USED_RING + RING_IDX]
	lea rdi, [rip + blk_word]
	movzx r9d, byte ptr [BUFFERS + 0x200]
	jmp report
.Lblk_gone:
	ret

/* A virtio-vsock attack with a stream RW packet of a page, whose
 * payload the device reads from the data descriptor. */
vsock_attack:
	mov dword ptr [PARAM_HEADER_LEN], VSOCK_HEADER_LEN
	mov dword ptr [PARAM_DATA_FLAGS], 0
	/* r15 held the command line, no longer needed once an attack runs. */
	mov r15, r13
	lea r13, [rip + vsock_chain]
	mov edi, VIRTIO_ID_VSOCK
	mov esi, VSOCK_TX_QUEUE
	jmp queue_attack

/* The chain writer in r15, then the packet header (after the rings are zeroed). */
vsock_chain:
	call r15
	mov dword ptr [BUFFERS + VSOCK_HDR_LEN], 0x1000
	mov word ptr [BUFFERS + VSOCK_HDR_TYPE], VSOCK_TYPE_STREAM
	mov word ptr [BUFFERS + VSOCK_HDR_OP], VSOCK_OP_RW
	ret

/*
 * A guest that accepts a host connection and then never returns credit:
 * 8 receive buffers of a page, never given back, a RESPONSE advertising
 * GUEST_BUF_ALLOC bytes of buffer, and no CREDIT_UPDATE ever, while the
 * host (the test) writes all it can. The device must send at most that
 * much and stop reading the host socket. Reports the device status, the
 * receive queue's used index and the transmit queue's.
 */
attack_vsock_credit:
	mov edi, VIRTIO_ID_VSOCK
	call find_device
	test rbp, rbp
	jz .Lmissing_vsock
	call negotiate
	mov esi, VSOCK_RX_QUEUE
	mov edi, RX_RINGS
	call setup_queue
	mov esi, VSOCK_TX_QUEUE
	mov edi, DESC_TABLE
	call setup_queue
	/* Receive descriptor i: buffer i, a page, device-writable; all
	 * available. */
	xor ecx, ecx
.Lrx_buffer:
	mov eax, ecx
	shl eax, 12
	add eax, RX_BUFFERS
	mov edx, ecx
	shl edx, 4
	mov qword ptr [RX_RINGS + rdx + DESC_ADDR], rax
	mov dword ptr [RX_RINGS + rdx + DESC_LEN], 4096
	mov word ptr [RX_RINGS + rdx + DESC_FLAGS], DESC_F_WRITE
	mov word ptr [RX_AVAIL + RING_ENTRIES + rcx * 2], cx
	inc ecx
	cmp ecx, QUEUE_SIZE
	jb .Lrx_buffer
	mov word ptr [RX_AVAIL + RING_IDX], QUEUE_SIZE
	call driver_ok
	mov dword ptr [rbp + MMIO_QUEUE_NOTIFY], VSOCK_RX_QUEUE
	/* The host's REQUEST lands in buffer 0. */
	mov r12d, VSOCK_CONNECT_WAITS
.Lawait_request:
	cmp word ptr [RX_USED + RING_IDX], 0
	jne .Lrespond
	call wait_period
	dec r12d
	jnz .Lawait_request
	jmp .Lcredit_report
.Lrespond:
	mov rax, qword ptr [RX_BUFFERS + VSOCK_HDR_DST_CID]
	mov qword ptr [BUFFERS + VSOCK_HDR_SRC_CID], rax
	mov rax, qword ptr [RX_BUFFERS + VSOCK_HDR_SRC_CID]
	mov qword ptr [BUFFERS + VSOCK_HDR_DST_CID], rax
	mov eax, dword ptr [RX_BUFFERS + VSOCK_HDR_DST_PORT]
	mov dword ptr [BUFFERS + VSOCK_HDR_SRC_PORT], eax
	mov eax, dword ptr [RX_BUFFERS + VSOCK_HDR_SRC_PORT]
	mov dword ptr [BUFFERS + VSOCK_HDR_DST_PORT], eax
	mov word ptr [BUFFERS + VSOCK_HDR_TYPE], VSOCK_TYPE_STREAM
	mov word ptr [BUFFERS + VSOCK_HDR_OP], VSOCK_OP_RESPONSE
	mov dword ptr [BUFFERS + VSOCK_HDR_BUF_ALLOC], GUEST_BUF_ALLOC
	mov qword ptr [DESC_TABLE + DESC_ADDR], BUFFERS
	mov dword ptr [DESC_TABLE + DESC_LEN], VSOCK_HEADER_LEN
	mov word ptr [AVAIL_RING + RING_IDX], 1
	mov dword ptr [rbp + MMIO_QUEUE_NOTIFY], VSOCK_TX_QUEUE
	mov r12d, VSOCK_IDLE_WAITS
.Lsit_on_credit:
	call wait_period
	dec r12d
	jnz .Lsit_on_credit
.Lcredit_report:
	lea rsi, [rip + vsock_credit_name]
	movzx r8d, word ptr [RX_USED + RING_IDX]
	lea rdi, [rip + tx_word]
	movzx r9d, word ptr [USED_RING + RING_IDX]
	jmp report
.Lmissing_vsock:
	lea rsi, [rip + no_device]
	jmp print

/* Spins for WAIT_TICKS TSC ticks. */
wait_period:
	rdtsc
	mov r11d, eax
.Lwait_period:
	pause
	rdtsc
	sub eax, r11d
	cmp eax, WAIT_TICKS
	jb .Lwait_period
	ret

/* Every byte an 'x', a line break every 64: a console's worst case. */
attack_serial_flood:
	mov dx, COM1
	mov ecx, SERIAL_FLOOD_BYTES
.Lflood_byte:
	mov al, 'x'
	test ecx, 63
	jnz .Lflood_send
	mov al, '\n'
.Lflood_send:
	out dx, al
	loop .Lflood_byte
	lea rsi, [rip + serial_done]
	jmp print

/* Undefined events, wrong widths and wrong offsets, round after round. */
attack_init_flood:
	mov ecx, INIT_FLOOD_WRITES
.Linit_write:
	mov dx, INIT_PORT
	mov eax, ecx
	or eax, 0xff000000
	out dx, eax
	out dx, al
	out dx, ax
	inc dx
	out dx, al
	loop .Linit_write
	lea rsi, [rip + init_done]
	jmp print

/* Every round rewrites one of the first 16 redirection entries, both
 * halves, with bits scattered from the round's number: vectors, delivery
 * modes, destinations, masks and the read-only and reserved bits all
 * change, so most rounds change a route. Between them: a byte write to
 * IOWIN, a word and a quadword to IOREGSEL, a write past the last entry
 * and one to the read-only version register. */
attack_ioapic_flood:
	mov edi, IOAPIC_START
	mov ecx, IOAPIC_FLOOD_ROUNDS
.Lioapic_round:
	mov eax, ecx
	and eax, 15
	lea eax, [eax * 2 + IOREDTBL + 1]
	mov dword ptr [rdi + IOREGSEL], eax
	imul edx, ecx, SCATTER
	mov dword ptr [rdi + IOWIN], edx
	dec eax
	mov dword ptr [rdi + IOREGSEL], eax
	rol edx, 13
	mov dword ptr [rdi + IOWIN], edx
	mov byte ptr [rdi + IOWIN], dl
	mov word ptr [rdi + IOREGSEL], IOREDTBL_END
	mov dword ptr [rdi + IOWIN], edx
	mov rax, IOAPICVER
	mov qword ptr [rdi + IOREGSEL], rax
	mov dword ptr [rdi + IOWIN], edx
	loop .Lioapic_round
	mov dword ptr [rdi + IOREGSEL], IOAPICVER
	lea rsi, [rip + ioapic_done]
	call print
	mov eax, dword ptr [rdi + IOWIN]
	call print_hex
	lea rsi, [rip + crlf]
	jmp print

	.section .rodata
	/* The attacks: the command-line word, the routine, and for a queue
	 * attack its chain writer and how far each round moves the
	 * available index. */
	.balign 8
attacks:
	.quad word_blk_loop, blk_attack, chain_loop, 1
	.quad word_blk_outside, blk_attack, chain_outside, 1
	.quad word_blk_overflow, blk_attack, chain_overflow, 1
	.quad word_blk_avail, blk_attack, chain_loop, AVAIL_AHEAD
	.quad word_vsock_loop, vsock_attack, chain_loop, 1
	.quad word_vsock_outside, vsock_attack, chain_outside, 1
	.quad word_vsock_overflow, vsock_attack, chain_overflow, 1
	.quad word_vsock_avail, vsock_attack, chain_loop, AVAIL_AHEAD
	.quad word_vsock_credit, attack_vsock_credit, 0, 0
	.quad word_serial_flood, attack_serial_flood, 0, 0
	.quad word_init_flood, attack_init_flood, 0, 0
	.quad word_ioapic_flood, attack_ioapic_flood, 0, 0
	.quad 0, 0, 0, 0
word_blk_loop:
	.asciz "kiln.hostile=blk-loop"
word_blk_outside:
	.asciz "kiln.hostile=blk-outside"
word_blk_overflow:
	.asciz "kiln.hostile=blk-overflow"
word_blk_avail:
	.asciz "kiln.hostile=blk-avail"
word_vsock_loop:
	.asciz "kiln.hostile=vsock-loop"
word_vsock_outside:
	.asciz "kiln.hostile=vsock-outside"
word_vsock_overflow:
	.asciz "kiln.hostile=vsock-overflow"
word_vsock_avail:
	.asciz "kiln.hostile=vsock-avail"
word_vsock_credit:
	.asciz "kiln.hostile=vsock-credit"
word_serial_flood:
	.asciz "kiln.hostile=serial-flood"
word_init_flood:
	.asciz "kiln.hostile=init-flood"
word_ioapic_flood:
	.asciz "kiln.hostile=ioapic-flood"
hex_digits:
	.ascii "0123456789abcdef"
report_prefix:
	.asciz "hostile: "
report_status:
	.asciz " status="
report_used:
	.asciz " used="
rounds_word:
	.asciz "rounds"
vsock_credit_name:
	.asciz "vsock-credit"
tx_word:
	.asciz "tx"
blk_word:
	.asciz "blk"
recovered:
	.asciz "recovered"
crlf:
	.asciz "\r\n"
no_attack:
	.asciz "hostile: no attack\r\n"
no_device:
	.asciz "hostile: no such device\r\n"
serial_done:
	.asciz "\r\nhostile: serial-flood done\r\n"
init_done:
	.asciz "hostile: init-flood done\r\n"
ioapic_done:
	.asciz "hostile: ioapic-flood ver="
