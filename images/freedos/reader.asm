; READER.COM: reads files through DOS and prints their CRC-32 on COM1.
;
;   READER path...
;
; For every path: "SUM <path> <size> <crc32>" (size in decimal, CRC-32/IEEE as zlib.crc32
; computes it, 8 lower-case hex digits), or "READER ERROR open|read <path> <code>".
; Then "READER DONE" and QEMU exits (isa-debug-exit, 0 = every file read).

        cpu 386
        bits 16
        org 0x100

BUF             equ 0x4000
BUF_BYTES       equ 0x8000

start:
        cld
        call serial_init
        mov si, 0x81
        mov byte [status], 0
.next_path:
        call skip_spaces
        cmp byte [si], 13
        je .done
        cmp byte [si], 0
        je .done
        mov di, path
.copy:  lodsb
        cmp al, ' '
        je .copied
        cmp al, 9
        je .copied
        cmp al, 13
        je .last
        stosb
        jmp .copy
.last:  dec si                          ; leave the CR for the loop test
.copied:
        mov byte [di], 0
        push si
        call sum_file
        pop si
        jmp .next_path
.done:  mov si, msg_done
        call puts
        call newline
        mov al, [status]
        jmp quit

; sum_file: open [path], CRC it, print the SUM line (or an error line).
sum_file:
        mov ax, 0x3D00
        mov dx, path
        int 0x21
        jc .open_err
        mov [handle], ax
        mov dword [size], 0
        mov ebx, 0xFFFFFFFF
.read:  mov ah, 0x3F
        push ebx
        mov bx, [handle]
        mov cx, BUF_BYTES
        mov dx, BUF
        int 0x21
        pop ebx
        jc .read_err
        test ax, ax
        jz .eof
        movzx ecx, ax
        add [size], ecx
        mov si, BUF
.byte:  xor bl, [si]
        inc si
        mov dx, 8
.bit:   shr ebx, 1
        jnc .nox
        xor ebx, 0xEDB88320
.nox:   dec dx
        jnz .bit
        loop .byte
        jmp .read
.eof:   mov ah, 0x3E
        push ebx
        mov bx, [handle]
        int 0x21
        pop ebx
        not ebx
        mov si, msg_sum
        call puts
        mov si, path
        call puts
        mov al, ' '
        call putc
        mov eax, [size]
        call print_dec
        mov al, ' '
        call putc
        mov eax, ebx
        call print_hex
        call newline
        ret
.open_err:
        mov si, msg_open
        jmp .err
.read_err:
        mov si, msg_read
.err:   movzx eax, ax
        push eax
        push si
        mov si, msg_error
        call puts
        pop si
        call puts
        mov si, path
        call puts
        mov al, ' '
        call putc
        pop eax
        call print_hex
        call newline
        mov byte [status], 1
        ret

%include "common.inc"

msg_done        db "READER DONE", 0
msg_sum         db "SUM ", 0
msg_error       db "READER ERROR ", 0
msg_open        db "open ", 0
msg_read        db "read ", 0

        align 4
size            dd 0
handle          dw 0
status          db 0
path            times 128 db 0
