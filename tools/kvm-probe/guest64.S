.code64
.globl _start
_start:
    mov $1, %eax
    out %eax, $0x10          /* CPL0 port out */
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8
    mov $1000, %ecx
1:  movq %rcx, 0x8000
    dec %ecx
    jnz 1b
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    mov %rdx, %rax
    out %eax, $0x11          /* tsc cycles for 1000 CPL0 stores */
    /* go to CPL3 with IOPL3 */
    pushq $0x23
    pushq $0x90000
    pushq $0x3002
    pushq $0x1b
    lea user(%rip), %rax
    pushq %rax
    iretq
user:
    mov $3, %eax
    out %eax, $0x10
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov %rdx, %r8
    mov $10000000, %ecx
    mov $0x200000, %rdi
2:  mov %rcx, (%rdi)
    add $64, %rdi
    and $0x3ffffff, %rdi
    or $0x200000, %rdi
    dec %ecx
    jnz 2b
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %r8, %rdx
    mov %rdx, %rax
    out %eax, $0x12           /* cycles for 10M CPL3 stores */
    mov $0x3f8, %dx
    mov $'A', %al
    out %al, %dx
    mov $0x40000, %rax
    movq $5, (%rax)
    out %eax, $0x13
    hlt
