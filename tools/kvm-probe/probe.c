#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <errno.h>
#include <time.h>

static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){
  int mode64 = argc<2 || strcmp(argv[1],"32");
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC);
  printf("api %d\n", ioctl(kvm,KVM_GET_API_VERSION,0));
  int caps[]={KVM_CAP_IRQCHIP,KVM_CAP_USER_MEMORY,KVM_CAP_SET_TSS_ADDR,KVM_CAP_PIT2,KVM_CAP_EXT_CPUID,KVM_CAP_ADJUST_CLOCK,KVM_CAP_IMMEDIATE_EXIT,KVM_CAP_XSAVE,KVM_CAP_XCRS,KVM_CAP_VCPU_EVENTS,KVM_CAP_DEBUGREGS,KVM_CAP_MP_STATE,KVM_CAP_TSC_CONTROL,KVM_CAP_GET_TSC_KHZ,KVM_CAP_DIRTY_LOG_RING,KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,KVM_CAP_NR_VCPUS,KVM_CAP_MAX_VCPUS,KVM_CAP_IRQ_ROUTING,KVM_CAP_PIT_STATE2,KVM_CAP_KVMCLOCK_CTRL,KVM_CAP_XSAVE2,KVM_CAP_SET_IDENTITY_MAP_ADDR,KVM_CAP_SYNC_MMU,KVM_CAP_DIRTY_LOG_RING_ACQ_REL,KVM_CAP_SPLIT_IRQCHIP,KVM_CAP_X86_DISABLE_EXITS};
  const char*names[]={"IRQCHIP","USER_MEMORY","SET_TSS_ADDR","PIT2","EXT_CPUID","ADJUST_CLOCK","IMMEDIATE_EXIT","XSAVE","XCRS","VCPU_EVENTS","DEBUGREGS","MP_STATE","TSC_CONTROL","GET_TSC_KHZ","DIRTY_LOG_RING","MANUAL_DIRTY_LOG_PROTECT2","NR_VCPUS","MAX_VCPUS","IRQ_ROUTING","PIT_STATE2","KVMCLOCK_CTRL","XSAVE2","SET_IDENTITY_MAP_ADDR","SYNC_MMU","DIRTY_LOG_RING_ACQ_REL","SPLIT_IRQCHIP","DISABLE_EXITS"};
  for(unsigned i=0;i<sizeof(caps)/sizeof(caps[0]);i++) printf("cap %s = %d\n",names[i],ioctl(kvm,KVM_CHECK_EXTENSION,caps[i]));
  int vm=ioctl(kvm,KVM_CREATE_VM,0); printf("vm %d\n",vm);
  printf("tss %d\n", ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000));
  uint64_t ident=0xfffbc000; printf("ident %d\n", ioctl(vm,KVM_SET_IDENTITY_MAP_ADDR,&ident));
  printf("irqchip %d %s\n", ioctl(vm,KVM_CREATE_IRQCHIP,0), strerror(errno));
  struct kvm_pit_config pc={.flags=KVM_PIT_SPEAKER_DUMMY}; printf("pit2 %d %s\n", ioctl(vm,KVM_CREATE_PIT2,&pc), strerror(errno));
  size_t memsz=1ul<<30;
  uint8_t*mem=mmap(0,memsz,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.flags=KVM_MEM_LOG_DIRTY_PAGES,.guest_phys_addr=0,.memory_size=memsz,.userspace_addr=(uint64_t)mem};
  printf("setmem %d %s\n", ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r),strerror(errno));
  FILE*f=fopen(mode64?"g64.bin":"g32.bin","rb"); fread(mem+0x100000,1,4096,f); fclose(f);
  // page tables
  uint64_t*pml4=(uint64_t*)(mem+0x1000),*pdpt=(uint64_t*)(mem+0x2000),*pd=(uint64_t*)(mem+0x3000);
  pml4[0]=0x2000|7; pdpt[0]=0x3000|7; for(int i=0;i<512;i++) pd[i]=(i*0x200000ul)|0x87;
  uint64_t*gdt=(uint64_t*)(mem+0x500);
  gdt[0]=0; gdt[1]=0x00AF9A000000FFFF; gdt[2]=0x00CF92000000FFFF; gdt[3]=0x00AFFA000000FFFF; gdt[4]=0x00CFF2000000FFFF; gdt[5]=0x00CF9A000000FFFF;
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0); printf("vcpu %d\n",vcpu);
  int runsz=ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0);
  struct kvm_run*run=mmap(0,runsz,PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256];} cp={.c.nent=256};
  printf("getcpuid %d\n", ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp));
  printf("setcpuid %d %s nent=%d\n", ioctl(vcpu,KVM_SET_CPUID2,&cp),strerror(errno),cp.c.nent);
  for(unsigned i=0;i<cp.c.nent;i++) if(cp.e[i].function==1||cp.e[i].function==0x80000007||cp.e[i].function==0x40000000||cp.e[i].function==0x40000001) printf(" cpuid %x.%x: %x %x %x %x\n",cp.e[i].function,cp.e[i].index,cp.e[i].eax,cp.e[i].ebx,cp.e[i].ecx,cp.e[i].edx);
  printf("tsc khz %d\n", ioctl(vcpu,KVM_GET_TSC_KHZ,0));
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  s.gdt.base=0x500; s.gdt.limit=47;
  if(mode64){
    struct kvm_segment cs={.base=0,.limit=0xffffffff,.selector=8,.type=11,.present=1,.dpl=0,.db=0,.s=1,.l=1,.g=1};
    struct kvm_segment ds={.base=0,.limit=0xffffffff,.selector=16,.type=3,.present=1,.dpl=0,.db=1,.s=1,.l=0,.g=1};
    s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds;
    s.cr3=0x1000; s.cr4=0x20; s.cr0=0x80050033; s.efer=0x500;
  } else {
    struct kvm_segment cs={.base=0,.limit=0xffffffff,.selector=0x28,.type=11,.present=1,.dpl=0,.db=1,.s=1,.l=0,.g=1};
    struct kvm_segment ds={.base=0,.limit=0xffffffff,.selector=16,.type=3,.present=1,.dpl=0,.db=1,.s=1,.l=0,.g=1};
    s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.cr0=0x11;
  }
  printf("sregs %d %s\n", ioctl(vcpu,KVM_SET_SREGS,&s),strerror(errno));
  struct kvm_regs g={0}; g.rip=0x100000; g.rflags=2; g.rsp=0x80000;
  printf("regs %d\n", ioctl(vcpu,KVM_SET_REGS,&g));
  double t0=now();
  for(int n=0;n<20;n++){
    int rc=ioctl(vcpu,KVM_RUN,0);
    if(rc<0){printf("run err %s\n",strerror(errno));break;}
    if(run->exit_reason==KVM_EXIT_IO){
      uint32_t v=*(uint32_t*)((uint8_t*)run+run->io.data_offset);
      printf("[%.3f] io port %x val %u (size %d dir %d)\n",now()-t0,run->io.port,run->io.size==1?(v&0xff):v,run->io.size,run->io.direction);
      if(run->io.port==0x13){printf("mem[0x40000]=%lu mem[0x8000]=%lu\n",*(uint64_t*)(mem+0x40000),*(uint64_t*)(mem+0x8000));}
    } else {
      printf("exit %d\n",run->exit_reason);
      if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR) printf(" suberr %d\n",run->internal.suberror);
      if(run->exit_reason==KVM_EXIT_FAIL_ENTRY) printf(" hw %llx\n",run->fail_entry.hardware_entry_failure_reason);
      struct kvm_regs rr; ioctl(vcpu,KVM_GET_REGS,&rr); printf(" rip %llx\n",rr.rip);
      if(run->exit_reason!=KVM_EXIT_HLT) break; else break;
    }
  }
  // dirty log
  unsigned long bm[(1<<18)/64]={0};
  struct kvm_dirty_log dl={.slot=0}; dl.dirty_bitmap=bm;
  printf("dirtylog %d %s\n", ioctl(vm,KVM_GET_DIRTY_LOG,&dl), strerror(errno));
  int cnt=0; for(int i=0;i<(1<<18)/64;i++) cnt+=__builtin_popcountl(bm[i]); printf("dirty pages %d\n",cnt);
  return 0;
}
