; WRITER.COM: the guest workload of the snapimg VM rig.
;
;   WRITER first last raw_sectors file_kib
;
; For each generation g = first..last:
;   1. writes raw_sectors stamped sectors, in order, at the start of the raw region of the test
;      disk with INT 13h AH=43h.  Every 16 bytes of a sector hold the record
;      ["STMP", lba, g, lba ^ g ^ 0xA5A5A5A5] (little-endian dwords).
;   2. writes C:\Fk.DAT (k = g mod 3) of file_kib KiB with INT 21h, every 16 bytes
;      ["FDAT", offset / 512, g, (offset / 512) ^ g ^ 0xA5A5A5A5], closes it and flushes DOS.
; The test disk is the BIOS hard disk whose sector 0 holds, at offset 0x100, "SNAPIMG-TESTDISK"
; followed by the raw region's first LBA and sector count: nothing is written to any other disk
; (megasas numbers disks in reverse order).
; Lines on COM1: "WRITER START ...", "GEN g RAW", "GEN g FILE Fk.DAT", "GEN g DONE",
; "WRITER DONE" or "WRITER ERROR ..."; then QEMU exits (isa-debug-exit, 0 = success).

        cpu 386
        bits 16
        org 0x100

CHUNK_SECTORS   equ 64                  ; 32 KiB per INT 13h / INT 21h call
BUF             equ 0x4000              ; 32 KiB data buffer
MBR             equ 0x2000              ; sector 0 of the disk being probed
MARKER_OFS      equ 0x100

start:
        cld
        call serial_init
        mov si, 0x81
        call parse_dec
        jc usage
        mov [first_gen], eax
        call parse_dec
        jc usage
        mov [last_gen], eax
        call parse_dec
        jc usage
        mov [raw_sectors], eax
        call parse_dec
        jc usage
        shl eax, 10
        mov [file_bytes], eax

        call find_disk
        mov eax, [raw_sectors]
        cmp eax, [region_count]
        ja region_too_small

        mov si, msg_start
        call puts
        movzx eax, byte [drive]
        call print_hex
        mov si, msg_raw
        call puts
        mov eax, [region_start]
        call print_dec
        mov al, '+'
        call putc
        mov eax, [raw_sectors]
        call print_dec
        mov si, msg_gens
        call puts
        mov eax, [first_gen]
        call print_dec
        mov si, msg_dots
        call puts
        mov eax, [last_gen]
        call print_dec
        call newline

        mov eax, [first_gen]
        mov [gen], eax
.gen_loop:
        mov eax, [gen]
        cmp eax, [last_gen]
        ja .all_done
        mov si, msg_raw_phase
        call gen_line
        call write_raw
        call write_file
        mov si, msg_done_phase
        call gen_line
        inc dword [gen]
        jmp .gen_loop
.all_done:
        mov si, msg_all_done
        call puts
        call newline
        xor al, al
        jmp quit

usage:
        mov si, msg_usage
        jmp fail
region_too_small:
        mov si, msg_small
        jmp fail

; fail: "WRITER ERROR <SI text>" and exit code 1.
fail:
        push si
        mov si, msg_error
        call puts
        pop si
        call puts
        call newline
        mov al, 1
        jmp quit

; fail_code: like fail, with the number in EAX appended.
fail_code:
        push si
        mov si, msg_error
        call puts
        pop si
        call puts
        mov al, ' '
        call putc
        call print_hex
        call newline
        mov al, 1
        jmp quit

; gen_line: "GEN <gen> <SI text>" CR LF.
gen_line:
        push si
        mov si, msg_gen
        call puts
        mov eax, [gen]
        call print_dec
        pop si
        call puts
        call newline
        ret

; find_disk: the first BIOS hard disk carrying the marker -> [drive], region.
find_disk:
        push es
        xor ax, ax
        mov es, ax
        mov cl, [es:0x475]              ; number of hard disks
        pop es
        mov byte [drive], 0x80
.probe: test cl, cl
        jz .none
        push cx
        mov word [dap_count], 1
        mov word [dap_buf], MBR
        mov [dap_seg], ds
        mov dword [dap_lba], 0
        mov dword [dap_lba + 4], 0
        mov ah, 0x42
        mov dl, [drive]
        mov si, dap
        int 0x13
        pop cx
        jc .next
        mov si, MBR + MARKER_OFS
        mov di, marker
        push cx
        mov cx, 16
        repe cmpsb
        pop cx
        jne .next
        mov eax, [MBR + MARKER_OFS + 16]
        mov [region_start], eax
        mov eax, [MBR + MARKER_OFS + 20]
        mov [region_count], eax
        ret
.next:  inc byte [drive]
        dec cl
        jmp .probe
.none:  mov si, msg_nodisk
        jmp fail

; write_raw: one generation of stamped sectors over the raw region.
write_raw:
        mov eax, [region_start]
        mov [lba], eax
        mov eax, [raw_sectors]
        mov [left], eax
.chunk: mov eax, [left]
        test eax, eax
        jz .done
        mov ecx, CHUNK_SECTORS
        cmp eax, ecx
        jae .full
        mov ecx, eax
.full:  sub [left], ecx
        mov [dap_count], cx
        mov di, BUF
        mov ebx, 'STMP'
        mov edx, [lba]
        mov ebp, [gen]
        call fill_records
        mov word [dap_buf], BUF
        mov [dap_seg], ds
        mov eax, [lba]
        mov [dap_lba], eax
        mov dword [dap_lba + 4], 0
        add [lba], ecx
        mov ax, 0x4300
        mov dl, [drive]
        mov si, dap
        int 0x13
        jnc .chunk
        movzx eax, ah
        mov si, msg_int13
        jmp fail_code
.done:  ret

; write_file: C:\Fk.DAT for this generation, closed and flushed.
write_file:
        mov eax, [gen]
        xor edx, edx
        mov ecx, 3
        div ecx
        add dl, '0'
        mov [fname_digit], dl
        mov [msg_file_digit], dl
        mov si, msg_file_phase
        call gen_line
        mov ah, 0x3C
        xor cx, cx
        mov dx, fname
        int 0x21
        jc .create_err
        mov [handle], ax
        mov eax, [file_bytes]
        mov [left], eax
        mov dword [lba], 0              ; record index = offset / 512
.chunk: mov eax, [left]
        test eax, eax
        jz .close
        mov ecx, CHUNK_SECTORS * 512
        cmp eax, ecx
        jae .full
        mov ecx, eax
.full:  sub [left], ecx
        push ecx
        shr ecx, 9
        mov di, BUF
        mov ebx, 'FDAT'
        mov edx, [lba]
        mov ebp, [gen]
        call fill_records
        add [lba], ecx
        pop ecx
        mov ah, 0x40
        mov bx, [handle]
        mov dx, BUF
        int 0x21
        jc .write_err
        cmp ax, cx
        jne .short_write
        jmp .chunk
.close: mov ah, 0x3E
        mov bx, [handle]
        int 0x21
        jc .close_err
        mov ah, 0x0D
        int 0x21
        ret
.create_err:
        mov si, msg_create
        jmp .code
.write_err:
        mov si, msg_write
        jmp .code
.close_err:
        mov si, msg_close
.code:  movzx eax, ax
        jmp fail_code
.short_write:
        mov si, msg_short
        jmp fail

%include "common.inc"

marker          db "SNAPIMG-TESTDISK"
msg_usage       db "usage: WRITER first last raw_sectors file_kib", 0
msg_small       db "raw region smaller than raw_sectors", 0
msg_nodisk      db "no disk with the SNAPIMG-TESTDISK marker", 0
msg_int13       db "int13 write status", 0
msg_create      db "create", 0
msg_write       db "write", 0
msg_close       db "close", 0
msg_short       db "short file write (disk full?)", 0
msg_error       db "WRITER ERROR ", 0
msg_start       db "WRITER START drive=0x", 0
msg_raw         db " raw=", 0
msg_gens        db " gens=", 0
msg_dots        db "..", 0
msg_gen         db "GEN ", 0
msg_raw_phase   db " RAW", 0
msg_file_phase  db " FILE F"
msg_file_digit  db "0"
                db ".DAT", 0
msg_done_phase  db " DONE", 0
msg_all_done    db "WRITER DONE", 0
fname           db "C:\F"
fname_digit     db "0"
                db ".DAT", 0

        align 4
dap             db 0x10, 0
dap_count       dw 0
dap_buf         dw 0
dap_seg         dw 0
dap_lba         dd 0, 0

first_gen       dd 0
last_gen        dd 0
raw_sectors     dd 0
file_bytes      dd 0
region_start    dd 0
region_count    dd 0
gen             dd 0
lba             dd 0
left            dd 0
handle          dw 0
drive           db 0

%if ($ - $$) + 0x100 > MBR
%error "program overlaps its buffers"
%endif
