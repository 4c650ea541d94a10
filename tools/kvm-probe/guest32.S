.code32
.globl _start
_start:
    mov $0x32, %eax
    out %eax, $0x10
    movl $7, 0x8000
    out %eax, $0x13
    hlt
